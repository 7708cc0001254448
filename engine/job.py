"""The labeling job: decode -> model stages -> label store, on Ray Data or in-process.

Ray Data plan (``runner="ray"``)::

    paths --map_batches(decode_batch, tasks)--> pixels
          --map_batches(stage 1, actor pool)--> ... --map_batches(stage k, actor pool)--> rows
          --iter_batches on the driver--> LabelSetWriter (atomic Parquet shards)

Decoding runs in stateless CPU tasks; each model stage is a callable class that loads its
model once per actor. Execution is streaming with Ray's backpressure, so memory stays
flat whatever the number of images. Actor pools are sized to leave CPUs for the decode
tasks: on CPU-only clusters a pool that takes every CPU starves the reads and hangs
(Ray Data docs, "Stateful transforms"; ``DESIGN.md``). ``runner="local"`` runs the same
functions and callables in this process, one batch at a time (small jobs, debugging, tests);
``runner="auto"`` picks it for jobs too small to repay Ray's start-up (:func:`choose_runner`).
Every stage runs wrapped in :class:`distillery.engine.stagetime.TimedStage`, whose timing
columns ride with the rows to the driver: the summary says where the time went.

Batches are dicts of equal-length columns. The decode step produces ``path``,
``image_id``, ``width``, ``height``, ``error`` (None or reason) and ``pixels`` (RGB uint8
bytes, row-major ``(height, width, 3)``; empty for error rows). The last stage must
return the columns of :data:`distillery.engine.record.ROW_SCHEMA`.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

from distillery.engine.images import DEFAULT_MAX_PIXELS, decode, error_kind
from distillery.engine.record import ROW_SCHEMA
from distillery.engine.stagetime import StageTimes, busy_column, spread, timed_class, with_columns
from distillery.engine.store import LabelSet

#: Columns of a decoded batch. Stages return Arrow tables with explicit types: a batch
#: whose ``error`` column is all null would otherwise be inferred as another type than
#: one with strings, and Ray cannot concatenate the blocks.
DECODED_SCHEMA = pa.schema([
    ("path", pa.string()), ("image_id", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("error", pa.string()), ("pixels", pa.binary()),
])


def as_table(columns: dict, schema: pa.Schema) -> pa.Table:
    """Columns (lists or numpy arrays; ragged fields as lists of 1-D arrays) -> typed Arrow table."""
    out = {}
    for f in schema:
        col = columns[f.name]
        if pa.types.is_list(f.type):
            col = [np.asarray(v).tolist() for v in col]
        out[f.name] = pa.array(list(col), type=f.type)
    return pa.Table.from_pydict(out, schema=schema)


def as_batch(table: pa.Table) -> dict:
    """Arrow table -> dict of numpy columns, as Ray Data's ``batch_format="numpy"`` gives."""
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


@dataclass
class StageSpec:
    """A model stage: ``cls(**kwargs)`` is built once per actor, then called on batches.

    Attributes:
        cls: a callable class ``(batch: dict) -> dict``, picklable (importable by name).
        kwargs: constructor keyword arguments (picklable).
        batch_size: rows per call.
        actors: actor pool size (``runner="ray"``).
        wants_gpu: ask for a GPU share per actor when the cluster has GPUs (``runner="ray"``,
            :func:`plan_actor_gpus`).
        name: the stage's name in the job summary's timings (default: the class name).
    """

    cls: type
    kwargs: dict
    batch_size: int = 4
    actors: int = 1
    wants_gpu: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.cls.__name__

    def timed(self) -> "StageSpec":
        """This stage wrapped in :class:`distillery.engine.stagetime.TimedStage` (same sizes and name)."""
        return replace(self, cls=timed_class(self.cls), kwargs={"cls": self.cls, "kwargs": self.kwargs,
                                                                "name": self.name})


@dataclass
class JobSummary:
    """What one :func:`run_label_job` call did, and where its time went (seconds, wall clock).

    Every field is bounded whatever the number of images (``errors`` counts by error kind).
    """

    labelset_id: str
    total: int = 0
    skipped: int = 0
    processed: int = 0
    labeled: int = 0
    instances: int = 0
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    #: the runner used (``ray`` or ``local``), and why when ``runner="auto"`` chose it
    runner: str = ""
    runner_reason: str = ""
    #: before the first labelled image reached the writer: Ray and actor start, model loads,
    #: the first batch through every stage
    startup_seconds: float = 0.0
    #: images/s after the first batch: the rate a large pool runs at
    steady_images_per_second: float = 0.0
    #: busy seconds per stage: ``decode``, each model stage by :attr:`StageSpec.name`, and
    #: ``write`` (the driver adding rows and writing shards); summed over workers
    busy_seconds: dict = field(default_factory=dict)
    #: model-load seconds per model stage, summed over its actors (constructor time)
    load_seconds: dict = field(default_factory=dict)
    #: per model stage, seconds after the job started when its last actor had loaded its model
    #: (``ray``: Ray's and the actor processes' start-up, imports and the load)
    ready_seconds: dict = field(default_factory=dict)
    #: seconds the driver waited for the next batch (``local``: the stages run in this wait)
    wait_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def image_of(batch: dict, i: int) -> np.ndarray:
    """Row ``i``'s pixels as RGB uint8 ``(height, width, 3)`` (a writable copy)."""
    h, w = int(batch["height"][i]), int(batch["width"][i])
    return np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(h, w, 3).copy()


def decode_batch(batch: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Decode a batch of ``path`` rows (see module docstring for the columns produced)."""
    out: dict[str, list] = {k: [] for k in ("path", "image_id", "width", "height", "error", "pixels")}
    for path in batch["path"]:
        d = decode(str(path), max_pixels)
        out["path"].append(d.path)
        out["image_id"].append(d.image_id)
        out["width"].append(d.width if d.error is None else 0)
        out["height"].append(d.height if d.error is None else 0)
        out["error"].append(d.error)
        out["pixels"].append(b"" if d.pixels is None else d.pixels.tobytes())
    return as_table(out, DECODED_SCHEMA)


def decode_timed(batch: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """:func:`decode_batch` plus its busy seconds per row (:mod:`distillery.engine.stagetime`)."""
    t = time.perf_counter()
    table = decode_batch(batch, max_pixels)
    return with_columns(table, {busy_column("decode"): spread(time.perf_counter() - t, table.num_rows)})


def plan_actor_cpus(total_cpus: float, node_cpus: float, stages: list[StageSpec]) -> float:
    """CPUs to reserve per actor on a CPU-only cluster.

    The actor pools together leave a quarter of the cluster (at least 0.5 CPU) to the
    decode tasks, and no actor asks for more than one node has (it would never be placed).
    The figure is rounded down to 0.01 CPU.

    Raises:
        ValueError: the actors cannot fit with room left for decoding.
    """
    n = sum(s.actors for s in stages)
    if n == 0:
        return 1.0
    per = (total_cpus - max(0.5, total_cpus * 0.25)) / n
    if per < 0.05:
        raise ValueError(
            f"{n} teacher actors do not fit in {total_cpus:g} CPUs with room for decoding; lower the actor counts"
        )
    return math.floor(min(per, node_cpus) * 100) / 100


def actor_threads(actor_cpus: float) -> int:
    """Intra-op threads (``OMP_NUM_THREADS``) of a CPU actor: its CPU share, at least 1, so the
    actors of a node together run about as many threads as it has cores.

    More oversubscribes the cores: OpenMP threads spin at every barrier and a preempted one
    stalls its team. On the shared 2-core machine, the tiny SAM's call took 2.2-2.9 s with 1
    thread and 4.5-8.6 s with 2 while other processes ran (``bench/label_throughput.py`` runs
    the loop at both counts).
    """
    return max(1, int(actor_cpus))


def plan_actor_gpus(total_gpus: float, stages: list[StageSpec]) -> float | None:
    """GPUs to reserve per GPU-wanting actor: an equal share of the cluster's GPUs, at most one
    (an actor drives one device), rounded down to 0.01. ``None`` when no GPU or no actor wants one.

    Every actor must fit at once or a stage never starts: with one GPU, a detector and a
    segmenter actor each asking for a whole GPU would wait for each other forever. Ray places
    fractional GPU requests on one device and sets ``CUDA_VISIBLE_DEVICES`` to it (Ray docs,
    "Fractional Accelerators").

    Raises:
        ValueError: more GPU actors than 100 per GPU (under 0.01 GPU each).
    """
    n = sum(s.actors for s in stages if s.wants_gpu)
    if n == 0 or total_gpus <= 0:
        return None
    per = math.floor(min(1.0, total_gpus / n) * 100) / 100
    if per < 0.01:
        raise ValueError(f"{n} GPU actors do not fit on {total_gpus:g} GPUs; lower the actor counts")
    return per


def _rows(batch: dict) -> Iterable[dict]:
    names = [f.name for f in ROW_SCHEMA]
    for i in range(len(batch["path"])):
        yield {k: batch[k][i] for k in names}


def build_stages(stages: list[StageSpec]) -> list:
    """``cls(**kwargs)`` of every stage, one after the other.

    Not in parallel threads: transformers' ``from_pretrained`` builds models under a context
    that puts new parameters on the meta device, and that is process-wide state. A SAM built in
    another thread during a Grounding DINO load got meta weights ("Cannot copy out of meta
    tensor"), seen in the suite with every detector/segmenter pair."""
    return [s.cls(**s.kwargs) for s in stages]


def _batches_local(paths, stages, max_pixels, decode_batch_size):
    built = build_stages(stages)
    for s in range(0, len(paths), decode_batch_size):
        table = decode_timed({"path": paths[s : s + decode_batch_size]}, max_pixels)
        for stage, spec in zip(built, stages):
            parts = [
                stage(as_batch(table.slice(j, spec.batch_size)))
                for j in range(0, table.num_rows, spec.batch_size)
            ]
            table = pa.concat_tables(parts)
        yield as_batch(table)


# Fault tolerance on Ray. A teacher actor that dies (``kill -9``, the OOM killer, a lost node)
# is restarted and the batch it held is resubmitted: Ray Data gives actor pools
# ``max_restarts=-1`` and ``max_task_retries=-1`` (``ActorPoolMapOperator._apply_default_remote_args``),
# and a decode task whose worker dies is retried by Ray Core (tasks' ``max_retries`` default 3).
# Stages are deterministic given their batch, so a retried batch yields the rows an
# uninterrupted run would (tests/engine/test_faults.py kills an actor mid-run). These are
# defaults, not arguments: Ray 2.60 deprecates passing ``max_restarts``/``max_task_retries``/
# ``max_retries`` through ``map_batches(**ray_remote_args)`` and removes it in 2.64.


def _batches_ray(paths, stages, max_pixels, decode_batch_size, ray_address):
    import ray

    if not ray.is_initialized():
        if ray_address:
            from distillery.engine.ray_local import check_ray_address

            check_ray_address(ray_address)
            ray.init(address=ray_address, log_to_driver=False)
        else:
            from distillery.engine.ray_local import init_local_ray

            init_local_ray(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # duplicates resolve to the first path listed
    ctx.enable_progress_bars = False
    resources = ray.cluster_resources()
    total_cpus, has_gpu = float(resources.get("CPU", 1)), resources.get("GPU", 0) > 0
    node_cpus = max(float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    actor_cpus = plan_actor_cpus(total_cpus, node_cpus, stages)
    actor_gpus = plan_actor_gpus(float(resources.get("GPU", 0)), stages)
    # one block per decode batch: the unit of streaming and of backpressure
    blocks = max(1, math.ceil(len(paths) / decode_batch_size))
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    # num_cpus differs from the actors', so Ray does not fuse decoding into the actors
    ds = ds.map_batches(decode_timed, fn_kwargs={"max_pixels": max_pixels}, batch_size=decode_batch_size,
                        num_cpus=0.5)
    for spec in stages:
        gpu = spec.wants_gpu and has_gpu
        ds = ds.map_batches(
            spec.cls,
            fn_constructor_kwargs=spec.kwargs,
            batch_size=spec.batch_size,
            compute=ray.data.ActorPoolStrategy(size=spec.actors),
            num_gpus=actor_gpus if gpu else None,
            num_cpus=1 if gpu else actor_cpus,
            runtime_env=None if gpu else {"env_vars": {"OMP_NUM_THREADS": str(actor_threads(actor_cpus))}},
        )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        yield batch


#: ``runner="auto"`` runs a job of fewer pending images than this in-process, where starting
#: Ray costs more than its pipelining buys back. Measured on the shared 2-core machine
#: (``bench/label_throughput.py``, coco128): Ray's start-up is 40-80 s (``ray.init`` 13-17 s,
#: then 23-40 s until the actor processes have imported torch and loaded the teachers), and
#: the Ray job overtakes the in-process one after about 10-26 images with the tiny teachers
#: and 2 with Grounding DINO-T + SAM ViT-B. On a GPU the per-image gain is smaller and the
#: crossover later; such jobs are large anyway.
AUTO_LOCAL_BELOW = 32


def choose_runner(pending: int, ray_address: str | None = None) -> tuple[str, str]:
    """The runner ``runner="auto"`` uses for ``pending`` images, and why (one line).

    Ray when a cluster address is given or Ray is already running in this process (its
    start-up is paid), or when ``pending >= AUTO_LOCAL_BELOW``; in-process otherwise.
    """
    import sys

    if ray_address:
        return "ray", f"runner ray: cluster {ray_address}"
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return "ray", "runner ray: Ray is already running in this process"
    if pending < AUTO_LOCAL_BELOW:
        return "local", (f"runner local: {pending} images < {AUTO_LOCAL_BELOW}, too few to repay Ray's start-up "
                         "(--runner ray to force it)")
    return "ray", f"runner ray: {pending} images (--runner local to stay in this process)"


def run_label_job(
    paths: list[str],
    labelset: LabelSet,
    stages: list[StageSpec],
    *,
    runner: str = "auto",
    ray_address: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shard_size: int = 256,
    flush_seconds: float | None = 60.0,
    decode_batch_size: int = 8,
    progress: bool = True,
    on_row: Callable[[dict], Any] | None = None,
    log: Callable[[str], Any] | None = None,
) -> JobSummary:
    """Label ``paths`` into ``labelset``, skipping paths it already holds (resume).

    Args:
        paths: image paths, in the order duplicates should be resolved.
        labelset: where rows go (see :class:`distillery.engine.store.LabelSet`).
        stages: model stages, in order; the last returns :data:`ROW_SCHEMA` columns. Each runs
            wrapped in :class:`distillery.engine.stagetime.TimedStage`.
        runner: ``"ray"`` (Ray Data; local cluster unless ``ray_address``), ``"local"`` (in this
            process, one batch at a time) or ``"auto"`` (:func:`choose_runner` on the pending images).
        max_pixels: images with more pixels become ``too-large`` error records.
        shard_size: rows per Parquet shard at most.
        flush_seconds: a shard is also written once its oldest row has waited this long, so a
            crash loses at most about this many seconds of finished rows, plus the images
            still in the pipeline (at most a block per stage); None: by size only.
        decode_batch_size: paths per decode task (and per Ray block).
        on_row: called with each row as stored.
        log: called with one-line start-up messages (the runner chosen, "starting Ray...",
            the first labelled image); e.g. ``click.echo`` to stderr.

    Returns:
        :class:`JobSummary` over this run (``skipped`` = already in the store), with the
        time per stage.

    Raises:
        ValueError: unknown runner. StoreError: another job holds the label set (its pid is
        named), or a shard cannot be written (e.g. the disk is full; rows already written stay).
    """
    if runner not in ("ray", "local", "auto"):
        raise ValueError(f"runner must be 'ray', 'local' or 'auto', got {runner!r}")
    say = log or (lambda line: None)
    start, started = time.perf_counter(), time.time()
    first = None
    summary = JobSummary(labelset.id, total=len(paths))
    times = StageTimes()
    timed = [s.timed() for s in stages]
    with labelset.writer(shard_size, flush_seconds=flush_seconds, track_paths=False) as writer:
        pending = [p for p in paths if p not in writer.done_paths]
        writer.done_paths.clear()  # not consulted again (track_paths=False): no per-image set in the driver
        summary.skipped = len(paths) - len(pending)
        if runner == "auto":
            runner, summary.runner_reason = choose_runner(len(pending), ray_address)
            if pending:
                say(summary.runner_reason)
        summary.runner = runner
        if pending:
            names = ", ".join(s.name for s in stages)
            if runner == "local":
                say(f"loading {names} in this process...")
                batches = _batches_local(pending, timed, max_pixels, decode_batch_size)
            else:
                say(f"starting Ray{' (' + ray_address + ')' if ray_address else ''} and actors for {names}...")
                batches = _batches_ray(pending, timed, max_pixels, decode_batch_size, ray_address)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(pending), unit="img", desc=f"label {labelset.id}", dynamic_ncols=True)
            write = 0.0
            while True:
                t = time.perf_counter()
                batch = next(batches, None)
                summary.wait_seconds += time.perf_counter() - t
                if batch is None:
                    break
                if first is None:
                    first = (time.perf_counter(), len(batch["path"]))
                    say(f"first labelled images after {first[0] - start:.1f} s")
                times.add(batch)
                t = time.perf_counter()
                for row in _rows(batch):
                    row = writer.add(row)
                    summary.processed += 1
                    if row["error"] is None:
                        summary.labeled += 1
                        summary.instances += len(row["box_score"])
                    else:
                        summary.errors[error_kind(row["error"])] += 1
                    if on_row is not None:
                        on_row(row)
                write += time.perf_counter() - t
                if bar is not None:
                    bar.update(len(batch["path"]))
            if bar is not None:
                bar.close()
            t = time.perf_counter()
    end = time.perf_counter()
    if pending:
        write += end - t  # the last shard, flushed when the writer closes
        summary.busy_seconds = {**dict(times.busy), "write": write}
        summary.load_seconds = dict(times.load)
        summary.ready_seconds = {k: v - started for k, v in times.ready.items() if v > 0}
    summary.seconds = end - start
    if first is not None:
        summary.startup_seconds = first[0] - start
        if end > first[0]:
            summary.steady_images_per_second = (summary.processed - first[1]) / (end - first[0])
    return summary
