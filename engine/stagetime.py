"""Where a labelling job's time goes: per-stage busy and load seconds, carried with the rows.

Every stage of :func:`distillery.engine.job.run_label_job` runs wrapped in :class:`TimedStage`,
which times the stage's constructor (model load) and each call, and adds the figures to
the batch as float64 columns, so that they travel with the rows from a Ray actor to the
driver without any side channel:

* ``_t_busy:<stage>``: seconds the stage spent on this row's batch, divided over its rows
  (summing the column over all rows gives the stage's busy seconds);
* ``_t_load:<stage>``: seconds the stage's constructor took, on the first row an instance
  returns, 0 elsewhere (the sum is the load time over all actors of the stage);
* ``_t_ready:<stage>``: when the constructor finished (``time.time()``, seconds since the
  epoch), on the same row, 0 elsewhere (the maximum is when the stage's last actor was ready).

The columns of earlier stages are taken off the batch before a stage sees it and put back on
its output, row for row; the writer never sees them (it takes the
:data:`distillery.engine.record.ROW_SCHEMA` columns). The cost is two ``perf_counter`` calls and
one float64 column per stage per batch.
"""

from __future__ import annotations

import functools
import time
from collections import Counter

import numpy as np
import pyarrow as pa

#: Prefix of every timing column.
TIMING_PREFIX = "_t_"


def busy_column(stage: str) -> str:
    """Name of the busy-seconds column of ``stage``."""
    return f"{TIMING_PREFIX}busy:{stage}"


def load_column(stage: str) -> str:
    """Name of the load-seconds column of ``stage``."""
    return f"{TIMING_PREFIX}load:{stage}"


def ready_column(stage: str) -> str:
    """Name of the ready-time column of ``stage``."""
    return f"{TIMING_PREFIX}ready:{stage}"


def num_rows(batch) -> int:
    """Rows of a batch: an Arrow table or a dict of equal-length columns."""
    if isinstance(batch, pa.Table):
        return batch.num_rows
    return len(next(iter(batch.values()))) if batch else 0


def with_columns(batch, columns: dict[str, np.ndarray]):
    """``batch`` (Arrow table or dict of columns) with float64 ``columns`` added, same type."""
    if isinstance(batch, pa.Table):
        for name, values in columns.items():
            batch = batch.append_column(name, pa.array(np.asarray(values, np.float64), pa.float64()))
        return batch
    return {**batch, **{k: np.asarray(v, np.float64) for k, v in columns.items()}}


def spread(seconds: float, n: int) -> np.ndarray:
    """``seconds`` divided equally over ``n`` rows (float64 ``(n,)``)."""
    return np.full(n, seconds / n if n else 0.0, np.float64)


class TimedStage:
    """A model stage (``cls(**kwargs)``, called on dict batches) with its time recorded.

    Args:
        cls, kwargs: the stage, as in :class:`distillery.engine.job.StageSpec`.
        name: the stage's name in the timing columns (e.g. ``detect``).

    Raises:
        ValueError (on a call): the stage returned another number of rows than it was given
            (a stage maps each row to one row).
    """

    def __init__(self, cls: type, kwargs: dict, name: str) -> None:
        t = time.perf_counter()
        self.stage = cls(**kwargs)
        self.name = name
        self._load = time.perf_counter() - t  # reported once, on the first batch returned
        self._ready = time.time()

    def __call__(self, batch: dict):
        timing = {k: v for k, v in batch.items() if k.startswith(TIMING_PREFIX)}
        inner = {k: v for k, v in batch.items() if not k.startswith(TIMING_PREFIX)}
        n = num_rows(inner)
        t = time.perf_counter()
        out = self.stage(inner)
        busy = time.perf_counter() - t
        if num_rows(out) != n:
            raise ValueError(f"stage {self.name} returned {num_rows(out)} rows for a batch of {n}; "
                             "a stage must return one row per input row, in order")
        load, ready = np.zeros(n, np.float64), np.zeros(n, np.float64)
        if n:
            load[0], ready[0], self._load, self._ready = self._load, self._ready, 0.0, 0.0
        return with_columns(out, {**timing, busy_column(self.name): spread(busy, n), load_column(self.name): load,
                                  ready_column(self.name): ready})


@functools.lru_cache(maxsize=None)
def timed_class(cls: type) -> type:
    """A :class:`TimedStage` subclass named like ``cls``, so that Ray's plan, logs and process
    titles read ``MapBatches(DetectStage)``, not ``MapBatches(TimedStage)`` for every stage."""
    return type(cls.__name__, (TimedStage,), {"__doc__": f"{cls.__name__}, timed (:class:`TimedStage`)."})


class StageTimes:
    """What the driver has seen of the timing columns: ``busy[stage]`` and ``load[stage]``
    (sums, seconds) and ``ready[stage]`` (latest, seconds since the epoch).

    Bounded: one entry per stage, whatever the number of images.
    """

    def __init__(self) -> None:
        self.busy: Counter = Counter()
        self.load: Counter = Counter()
        self.ready: dict[str, float] = {}

    def add(self, batch: dict) -> None:
        """Add a batch's timing columns (dict of columns)."""
        for k, v in batch.items():
            if k.startswith(TIMING_PREFIX):
                kind, stage = k[len(TIMING_PREFIX):].split(":", 1)
                if kind == "ready":
                    self.ready[stage] = max(self.ready.get(stage, 0.0), float(np.max(v, initial=0.0)))
                else:
                    (self.busy if kind == "busy" else self.load)[stage] += float(np.sum(v))
