from __future__ import annotations

import pytest


def test_actor_pools_leave_cpus_for_decoding():
    from distillery.engine.job import StageSpec, plan_actor_cpus

    two = [StageSpec(object, {}, actors=1), StageSpec(object, {}, actors=1)]
    assert plan_actor_cpus(2, 2, two) == 0.75  # 1.5 of 2 CPUs to the actors, 0.5 to decoding
    assert plan_actor_cpus(64, 16, two) == 16  # never more than one node has
    assert plan_actor_cpus(8, 8, two) == 3.0
    with pytest.raises(ValueError, match="do not fit"):
        plan_actor_cpus(1, 1, [StageSpec(object, {}, actors=20)])


def test_gpu_actors_share_the_gpus_so_every_stage_starts():
    from distillery.engine.job import StageSpec, plan_actor_gpus

    det, seg = StageSpec(object, {}, actors=1, wants_gpu=True), StageSpec(object, {}, actors=1, wants_gpu=True)
    # one GPU, a detector and a segmenter actor: half each (a whole GPU each never schedules the second)
    assert plan_actor_gpus(1, [det, seg]) == 0.5
    assert plan_actor_gpus(8, [det, seg]) == 1.0  # an actor drives one device
    assert plan_actor_gpus(1, [det, StageSpec(object, {}, actors=2, wants_gpu=True)]) == 0.33
    assert plan_actor_gpus(0, [det, seg]) is None
    assert plan_actor_gpus(4, [StageSpec(object, {}, actors=1)]) is None
    with pytest.raises(ValueError, match="do not fit"):
        plan_actor_gpus(1, [StageSpec(object, {}, actors=101, wants_gpu=True)])


def test_actor_threads_never_oversubscribe_the_node():
    from distillery.engine.job import StageSpec, actor_threads, plan_actor_cpus

    two = [StageSpec(object, {}), StageSpec(object, {})]
    assert actor_threads(plan_actor_cpus(2, 2, two)) == 1  # 0.75 CPU each on 2 cores: 1 thread each, 2 in all
    assert actor_threads(plan_actor_cpus(64, 16, two)) == 16
    assert actor_threads(plan_actor_cpus(32, 32, two)) == 12  # (32 - 8) / 2
    assert actor_threads(0.05) == 1


def test_auto_runner_stays_in_process_for_small_jobs():
    from distillery.engine.job import AUTO_LOCAL_BELOW, choose_runner

    runner, why = choose_runner(AUTO_LOCAL_BELOW - 1)
    assert runner == "local" and why == (f"runner local: {AUTO_LOCAL_BELOW - 1} images < {AUTO_LOCAL_BELOW}, too few "
                                         "to repay Ray's start-up (--runner ray to force it)")
    assert choose_runner(AUTO_LOCAL_BELOW)[0] == "ray"
    assert choose_runner(3, ray_address="ray://head:10001") == ("ray", "runner ray: cluster ray://head:10001")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_timed_stage_records_busy_and_load_seconds_and_passes_earlier_columns(monkeypatch):
    import numpy as np
    import pyarrow as pa

    from distillery.engine import stagetime
    from distillery.engine.stagetime import StageTimes, TimedStage, timed_class

    c = FakeClock()
    monkeypatch.setattr(stagetime, "time", type("T", (), {"perf_counter": staticmethod(c), "time": staticmethod(c)}))
    seen = []

    class Double:
        def __init__(self, factor):
            c.now += 1.5  # the model load
            self.factor = factor

        def __call__(self, batch):
            seen.append(sorted(batch))
            c.now += 0.4
            return pa.table({"x": np.asarray(batch["x"]) * self.factor})

    stage = timed_class(Double)(cls=Double, kwargs={"factor": 2}, name="double")
    assert isinstance(stage, TimedStage) and type(stage).__name__ == "Double"
    batch = {"x": np.arange(4), "_t_busy:decode": np.full(4, 0.25)}
    out = stage(batch)
    assert seen == [["x"]]  # the stage never sees timing columns
    assert out.column("x").to_pylist() == [0, 2, 4, 6]
    assert out.column("_t_busy:decode").to_pylist() == [0.25] * 4  # passed on, row for row
    np.testing.assert_allclose(out.column("_t_busy:double").to_numpy(), [0.1] * 4)
    assert out.column("_t_load:double").to_pylist() == [1.5, 0, 0, 0]
    assert out.column("_t_ready:double").to_pylist() == [101.5, 0, 0, 0]  # the clock when the load ended
    again = stage({"x": np.arange(2)})
    assert again.column("_t_load:double").to_pylist() == [0, 0]  # the load is reported once
    times = StageTimes()
    for t in (out, again):
        times.add({k: t.column(k).to_numpy() for k in t.column_names})
    assert dict(times.busy) == pytest.approx({"decode": 1.0, "double": 0.8})
    assert dict(times.load) == {"double": 1.5}
    assert times.ready == {"double": 101.5}


def test_timed_stage_refuses_a_stage_that_drops_rows():
    import numpy as np

    from distillery.engine.stagetime import TimedStage

    class Drop:
        def __call__(self, batch):
            return {"x": batch["x"][:1]}

    with pytest.raises(ValueError, match="stage drop returned 1 rows for a batch of 3"):
        TimedStage(Drop, {}, "drop")({"x": np.arange(3)})


def test_stages_are_built_in_order_with_real_weights_and_errors_surface(tiny_teachers):
    """Built in parallel threads, a SAM constructed during a Grounding DINO load got meta-device
    weights (transformers' loading is process-wide state): every parameter must hold data."""
    from distillery.engine.job import StageSpec, build_stages
    from distillery.labeling.ontology import Ontology
    from distillery.labeling.teachers import TeacherPreset, teacher_stages

    built = build_stages(teacher_stages(TeacherPreset.load(tiny_teachers), Ontology.from_classes("person,car")))
    nets = [built[0].teacher.model, built[1].teacher.sam]
    assert all(p.device.type == "cpu" for net in nets for p in net.parameters())

    class Broken:
        def __init__(self):
            raise OSError("weights not found")

    with pytest.raises(OSError, match="weights not found"):
        build_stages([StageSpec(Broken, {}), StageSpec(Broken, {})])


class PassStage:
    def __call__(self, batch):
        from distillery.engine.job import DECODED_SCHEMA, as_table

        return as_table(batch, DECODED_SCHEMA)


class EmptyLabels:
    def __call__(self, batch):
        from distillery.engine.record import LabelRecord, rows_to_table

        return rows_to_table([
            LabelRecord(image_id=str(i), path=str(p), width=int(w), height=int(h), num_classes=1).to_row()
            if e is None else LabelRecord.failed(str(p), str(e), 1, str(i)).to_row()
            for p, i, w, h, e in zip(batch["path"], batch["image_id"], batch["width"], batch["height"], batch["error"])
        ])


def test_local_job_summary_says_where_the_time_went(coco128, tmp_path):
    from distillery.engine.job import StageSpec, run_label_job
    from distillery.engine.store import LabelStore

    paths = [str(p) for p in sorted((coco128 / "images").glob("*.jpg"))[:3]] + [str(tmp_path / "missing.jpg")]
    ls = LabelStore(tmp_path / "store").create({"kind": "test", "ontology": {"classes": ["a"]}})
    lines = []
    s = run_label_job(paths, ls, [StageSpec(PassStage, {}, batch_size=3, name="pass"),
                                  StageSpec(EmptyLabels, {}, batch_size=2)], runner="auto", progress=False,
                      log=lines.append)
    assert (s.processed, s.labeled, dict(s.errors)) == (4, 3, {"missing": 1})
    assert s.runner == "local" and lines[0] == s.runner_reason
    assert s.runner_reason.startswith("runner local: 4 images <")
    assert lines[1] == "loading pass, EmptyLabels in this process..."
    assert lines[2].startswith("first labelled images after ")
    assert set(s.busy_seconds) == {"decode", "pass", "EmptyLabels", "write"}
    assert set(s.load_seconds) == {"pass", "EmptyLabels"}
    assert set(s.ready_seconds) == {"pass", "EmptyLabels"} and max(s.ready_seconds.values()) <= s.startup_seconds
    # every stage's busy time happened while the driver waited for the batch (one process)
    stages = sum(v for k, v in s.busy_seconds.items() if k != "write")
    assert 0 < stages <= s.wait_seconds <= s.seconds
    assert 0 < s.startup_seconds <= s.seconds
    again = run_label_job(paths, ls, [StageSpec(PassStage, {}), StageSpec(EmptyLabels, {})], progress=False,
                          log=lines.append)
    assert (again.skipped, again.processed) == (3, 1)  # the missing file is tried again
    assert set(again.busy_seconds) == {"decode", "PassStage", "EmptyLabels", "write"}  # default names: the classes'
