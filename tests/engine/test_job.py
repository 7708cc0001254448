"""The labeling job on Ray Data: bad inputs are recorded and skipped; kill -9 then rerun equals one run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distillery.engine.job import run_label_job
from distillery.engine.store import LabelStore
from distillery.labeling.ontology import Ontology
from distillery.labeling.teachers import TeacherPreset, labelset_spec, teacher_stages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool(coco128, tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    good = sorted((coco128 / "images").glob("*.jpg"))[:10]
    (d.parent / "spare").mkdir()
    shutil.copy(sorted((coco128 / "images").glob("*.jpg"))[20], d.parent / "spare")
    for p in good:
        shutil.copy(p, d / p.name)
    odd = d / "sub dir" / "ñandú 1.jpg"
    odd.parent.mkdir()
    shutil.copy(good[0], odd)  # same bytes as good[0]: a duplicate
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.png").write_text("hello")
    (d / "cut.jpg").write_bytes(good[1].read_bytes()[:5000])
    return d


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_job_labels_good_images_and_records_bad_ones(pool, preset_path, tmp_path, ray_local):
    from distillery.engine.images import list_source

    onto = Ontology.from_classes("person,car,giraffe,traffic light")
    preset = TeacherPreset.load(preset_path)
    ls = LabelStore(tmp_path).create(labelset_spec(onto, preset))
    paths = list_source(pool)
    s = run_label_job(paths, ls, teacher_stages(preset, onto), runner="ray", shard_size=4, progress=False)
    assert s.processed == len(paths) == 14
    assert dict(s.errors) == {"empty": 1, "not-an-image": 1, "truncated": 1, "duplicate": 1}
    assert s.labeled == 10
    recs = {Path(r.path).name: r for r in ls.iter_records()}
    assert len(recs) == 14
    assert recs["ñandú 1.jpg"].error.startswith("duplicate: same bytes as")
    for r in recs.values():
        if r.error is None:
            assert 0 < r.num_instances <= 8 and r.scores.shape[1] == 4
            assert all(m["size"] == [r.height, r.width] for m in r.masks)
    # a rerun skips what is done and tries the failed files again; a fixed file gets labeled
    again = run_label_job(paths, ls, teacher_stages(preset, onto), runner="ray", shard_size=4, progress=False)
    assert (again.skipped, again.processed, dict(again.errors)) == (11, 3, {"empty": 1, "not-an-image": 1, "truncated": 1})
    spare = next((pool.parent / "spare").glob("*.jpg"))
    shutil.copy(spare, pool / "empty.jpg")
    fixed = run_label_job(paths, ls, teacher_stages(preset, onto), runner="ray", shard_size=4, progress=False)
    assert (fixed.processed, fixed.labeled) == (3, 1)
    c = ls.counts()
    assert (c.images, c.labeled, dict(c.errors)) == (14, 11, {"not-an-image": 1, "truncated": 1, "duplicate": 1})
    (pool / "empty.jpg").write_bytes(b"")


def label_cmd(pool, store, preset_path):
    exe = Path(sys.executable).parent / "distillery"
    return [str(exe), "label", str(pool), "--classes", "person,car,giraffe", "--store", str(store),
            "--teachers", str(preset_path), "--shard-size", "2", "--block-size", "2", "--quiet",
            "--runner", "ray"]  # 14 images: --runner auto would stay in process


def snapshot(store):
    (ls,) = LabelStore(store).labelsets()
    recs = sorted(ls.iter_records(), key=lambda r: r.path)
    return ls, recs


def lingering(procs, timeout):
    """The processes of ``procs`` still running (zombies excluded) after waiting up to ``timeout`` s."""
    import psutil

    def alive(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in procs):
        time.sleep(0.1)
    return [f"{p.pid} {p.name()}" for p in procs if alive(p)]


def test_kill_9_then_rerun_equals_an_uninterrupted_run(pool, preset_path, tmp_path):
    """kill -9 of the `label` process alone (not its process group), as a user would: no Ray
    process it started outlives it by more than a few seconds (engine/ray_local.py), and a rerun
    equals an uninterrupted run."""
    import psutil

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    full = tmp_path / "full"
    subprocess.run(label_cmd(pool, full, preset_path), check=True, env=env, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(label_cmd(pool, cut, preset_path), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = cut / "labelsets"
    deadline = time.time() + 300
    while time.time() < deadline and not list(shards.glob("*/shards/*.parquet")):
        assert proc.poll() is None, "job ended before it could be interrupted"
        time.sleep(0.05)
    ray_procs = psutil.Process(proc.pid).children(recursive=True)
    assert any(p.name() == "raylet" for p in ray_procs)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lingering(ray_procs, timeout=10) == []  # before engine/ray_local.py: Ray's two agents, > 15 s
    partial = len(list(shards.glob("*/shards/*.parquet")))
    assert 1 <= partial < 7, "interrupted mid-run"
    out = subprocess.run(label_cmd(pool, cut, preset_path), check=True, env=env, capture_output=True, text=True)
    assert "already in the store" in out.stdout
    ls_full, a = snapshot(full)
    ls_cut, b = snapshot(cut)
    assert ls_full.id == ls_cut.id
    assert [r.path for r in a] == [r.path for r in b] and len(a) == 14  # nothing lost, nothing duplicated
    for x, y in zip(a, b):
        assert (x.image_id, x.error, x.num_instances) == (y.image_id, y.error, y.num_instances)
        np.testing.assert_array_equal(x.boxes, y.boxes)
        np.testing.assert_array_equal(x.scores, y.scores)
        assert [m["counts"] for m in x.masks] == [m["counts"] for m in y.masks]
