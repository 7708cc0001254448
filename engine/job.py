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
functions and callables in this process, one batch at a time (debugging, tests).

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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

from distillery.engine.images import DEFAULT_MAX_PIXELS, decode, error_kind
from distillery.engine.record import ROW_SCHEMA
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
    """

    cls: type
    kwargs: dict
    batch_size: int = 4
    actors: int = 1
    wants_gpu: bool = False


@dataclass
class JobSummary:
    labelset_id: str
    total: int = 0
    skipped: int = 0
    processed: int = 0
    labeled: int = 0
    instances: int = 0
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    #: until the first batch was written (cluster and actor start, model loads, first batch)
    startup_seconds: float = 0.0
    #: images/s after the first batch: the rate a large pool runs at
    steady_images_per_second: float = 0.0

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


def _batches_local(paths, stages, max_pixels, decode_batch_size):
    built = [s.cls(**s.kwargs) for s in stages]
    for s in range(0, len(paths), decode_batch_size):
        table = decode_batch({"path": paths[s : s + decode_batch_size]}, max_pixels)
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
    ds = ds.map_batches(decode_batch, fn_kwargs={"max_pixels": max_pixels}, batch_size=decode_batch_size,
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
            # Ray sets OMP_NUM_THREADS to the actor's (fractional, floored) CPUs. The teachers are
            # unbalanced (SAM's encoder dominates), so each actor may use every core of its
            # node: bench/label_throughput.py ratio 0.45 -> 0.66 on 2 cores.
            runtime_env=None if gpu else {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(node_cpus)))}},
        )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        yield batch


def run_label_job(
    paths: list[str],
    labelset: LabelSet,
    stages: list[StageSpec],
    *,
    runner: str = "ray",
    ray_address: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shard_size: int = 256,
    flush_seconds: float | None = 60.0,
    decode_batch_size: int = 8,
    progress: bool = True,
    on_row: Callable[[dict], Any] | None = None,
) -> JobSummary:
    """Label ``paths`` into ``labelset``, skipping paths it already holds (resume).

    Args:
        paths: image paths, in the order duplicates should be resolved.
        labelset: where rows go (see :class:`distillery.engine.store.LabelSet`).
        stages: model stages, in order; the last returns :data:`ROW_SCHEMA` columns.
        runner: ``"ray"`` (Ray Data; local cluster unless ``ray_address``) or ``"local"``.
        max_pixels: images with more pixels become ``too-large`` error records.
        shard_size: rows per Parquet shard at most.
        flush_seconds: a shard is also written once its oldest row has waited this long, so a
            crash loses at most about this many seconds of finished rows, plus the images
            still in the pipeline (at most a block per stage); None: by size only.
        decode_batch_size: paths per decode task (and per Ray block).

    Returns:
        :class:`JobSummary` over this run (``skipped`` = already in the store).

    Raises:
        ValueError: unknown runner. StoreError: another job holds the label set (its pid is
        named), or a shard cannot be written (e.g. the disk is full; rows already written stay).
    """
    if runner not in ("ray", "local"):
        raise ValueError(f"runner must be 'ray' or 'local', got {runner!r}")
    start = time.perf_counter()
    first = None
    summary = JobSummary(labelset.id, total=len(paths))
    with labelset.writer(shard_size, flush_seconds=flush_seconds, track_paths=False) as writer:
        pending = [p for p in paths if p not in writer.done_paths]
        writer.done_paths.clear()  # not consulted again (track_paths=False): no per-image set in the driver
        summary.skipped = len(paths) - len(pending)
        if pending:
            if runner == "local":
                batches = _batches_local(pending, stages, max_pixels, decode_batch_size)
            else:
                batches = _batches_ray(pending, stages, max_pixels, decode_batch_size, ray_address)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(pending), unit="img", desc=f"label {labelset.id}", dynamic_ncols=True)
            for batch in batches:
                if first is None:
                    first = (time.perf_counter(), len(batch["path"]))
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
                if bar is not None:
                    bar.update(len(batch["path"]))
            if bar is not None:
                bar.close()
    end = time.perf_counter()
    summary.seconds = end - start
    if first is not None:
        summary.startup_seconds = first[0] - start
        if end > first[0]:
            summary.steady_images_per_second = (summary.processed - first[1]) / (end - first[0])
    return summary
