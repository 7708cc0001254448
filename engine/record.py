"""The label record: the one type every stage passes (see docs in ``../shared/docs/DESIGN.md``).

One record per image; per instance, parallel arrays. Conventions, stated once here and
repeated where they matter:

* boxes are ``xyxy`` in absolute pixels of the EXIF-corrected frame, clipped to it;
* sizes are ``height, width`` where an array shape is meant;
* masks are compressed COCO RLE (``pycocotools.mask``) over the full frame, with
  ``size == [height, width]`` and ``counts`` as ``bytes``;
* class ids index the label set's ontology (column ``j`` of ``scores`` is class ``j``).

The record also converts to and from one flat row (``to_row`` / ``from_row``) whose
Arrow schema (:data:`ROW_SCHEMA`) is what Parquet shards and Ray batches carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

#: Version of the row schema written to shards; bump on incompatible change.
SCHEMA_VERSION = 1

ROW_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("error", pa.string(), nullable=True),
        # flattened row-major: boxes N*4, scores N*C
        pa.field("boxes", pa.list_(pa.float32()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("box_score", pa.list_(pa.float32()), nullable=False),
        pa.field("mask_counts", pa.list_(pa.binary()), nullable=False),
        pa.field("mask_score", pa.list_(pa.float32()), nullable=False),
        pa.field("iscrowd", pa.list_(pa.bool_()), nullable=False),
    ]
)


class RecordError(ValueError):
    """A label record was built with arrays of the wrong shape, dtype or range."""


def _as(name: str, value: Any, dtype, shape: tuple) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.size == 0 and arr.ndim != len(shape):
        arr = arr.reshape(tuple(0 if s is None else s for s in shape))
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise RecordError(f"{name}: expected shape {want}, got {arr.shape}")
    return arr


@dataclass
class LabelRecord:
    """Labels of one image.

    Attributes:
        image_id: sha256 hex digest of the file's bytes (same bytes, same id).
        path: where the image was read.
        width, height: pixels of the image after EXIF orientation is applied.
        boxes: float32 ``(N, 4)`` xyxy, absolute pixels, clipped to ``[0, width] x [0, height]``.
        scores: float32 ``(N, C)`` soft class scores in ``[0, 1]``, one column per ontology class.
        box_score: float32 ``(N,)`` detector confidence (max over ``scores`` unless a
            teacher says otherwise).
        masks: ``N`` compressed COCO RLE dicts ``{"size": [height, width], "counts": bytes}``.
        mask_score: float32 ``(N,)`` SAM's predicted IoU for each mask (1.0 for imported labels).
        iscrowd: bool ``(N,)`` COCO crowd flag (only imported human labels set it).
        error: why this image has no labels (unreadable, too large, ...), else ``None``.

    Raises:
        RecordError: on construction, if any array disagrees with N, C or the frame.
    """

    image_id: str
    path: str
    width: int
    height: int
    num_classes: int
    boxes: np.ndarray = field(default=None)
    scores: np.ndarray = field(default=None)
    box_score: np.ndarray = field(default=None)
    masks: list = field(default_factory=list)
    mask_score: np.ndarray = field(default=None)
    iscrowd: np.ndarray = field(default=None)
    error: str | None = None

    def __post_init__(self) -> None:
        C = int(self.num_classes)
        if C < 1:
            raise RecordError(f"num_classes must be >= 1, got {C}")
        self.boxes = _as("boxes", [] if self.boxes is None else self.boxes, np.float32, (None, 4))
        n = len(self.boxes)
        self.scores = _as("scores", np.zeros((n, C)) if self.scores is None else self.scores, np.float32, (n, C))
        if self.box_score is None:
            self.box_score = self.scores.max(axis=1) if n else np.zeros(0)
        self.box_score = _as("box_score", self.box_score, np.float32, (n,))
        self.mask_score = _as(
            "mask_score", np.ones(n) if self.mask_score is None else self.mask_score, np.float32, (n,)
        )
        self.iscrowd = _as("iscrowd", np.zeros(n) if self.iscrowd is None else self.iscrowd, bool, (n,))
        if self.error is not None:
            if n:
                raise RecordError(f"{self.path}: an error record carries no instances, got {n}")
            return
        if self.width < 1 or self.height < 1:
            raise RecordError(f"{self.path}: image size must be positive, got {self.width}x{self.height}")
        if len(self.masks) != n:
            raise RecordError(f"masks: expected {n} RLEs, got {len(self.masks)}")
        for m in self.masks:
            if list(m["size"]) != [self.height, self.width]:
                raise RecordError(
                    f"{self.path}: mask size {list(m['size'])} != [height, width] = {[self.height, self.width]}"
                )
        if n:
            b = self.boxes
            if not np.isfinite(b).all() or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
                raise RecordError(f"{self.path}: boxes must be finite xyxy with x2 >= x1 and y2 >= y1")
            if b.min() < 0 or (b[:, [0, 2]] > self.width).any() or (b[:, [1, 3]] > self.height).any():
                raise RecordError(f"{self.path}: boxes must be clipped to the {self.width}x{self.height} frame")
            for name in ("scores", "box_score", "mask_score"):
                a = getattr(self, name)
                if not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
                    raise RecordError(f"{self.path}: {name} must lie in [0, 1]")

    @property
    def num_instances(self) -> int:
        return len(self.boxes)

    @property
    def instance_ids(self) -> list[str]:
        """Stable id of each instance: 16 hex of blake2b over ``image_id``, the box's float32
        xyxy bytes and its top class. The same image labeled by the same teachers gives the
        same ids (a resumed or repeated job), so curation decisions keyed by them survive a
        relabel. Identical (box, class) pairs, which NMS normally removes, get ``-1``, ``-2``...
        """
        import hashlib

        top = self.scores.argmax(1)
        ids: list[str] = []
        seen: dict[str, int] = {}
        for box, cls in zip(self.boxes, top):
            h = hashlib.blake2b(self.image_id.encode(), digest_size=8)
            h.update(np.ascontiguousarray(box, np.float32).tobytes())
            h.update(int(cls).to_bytes(4, "little"))
            iid = h.hexdigest()
            n = seen.get(iid, 0)
            seen[iid] = n + 1
            ids.append(iid if n == 0 else f"{iid}-{n}")
        return ids

    @classmethod
    def failed(cls, path: str, error: str, num_classes: int, image_id: str = "") -> "LabelRecord":
        """An error record: the image is accounted for but carries no labels."""
        return cls(image_id=image_id, path=path, width=0, height=0, num_classes=num_classes, error=error)

    def to_row(self) -> dict:
        """Flatten to one row of :data:`ROW_SCHEMA` (numpy arrays, bytes and scalars)."""
        return {
            "image_id": self.image_id,
            "path": self.path,
            "width": int(self.width),
            "height": int(self.height),
            "error": self.error,
            "boxes": self.boxes.reshape(-1),
            "scores": self.scores.reshape(-1),
            "box_score": self.box_score,
            "mask_counts": [m["counts"] for m in self.masks],
            "mask_score": self.mask_score,
            "iscrowd": self.iscrowd,
        }

    @classmethod
    def from_row(cls, row: dict, num_classes: int) -> "LabelRecord":
        """Inverse of :meth:`to_row`; ``num_classes`` comes from the label set's ontology."""
        h, w = int(row["height"]), int(row["width"])
        counts = row["mask_counts"]
        counts = [] if counts is None else list(counts)
        return cls(
            image_id=row["image_id"],
            path=row["path"],
            width=w,
            height=h,
            num_classes=num_classes,
            boxes=np.asarray(row["boxes"], np.float32).reshape(-1, 4),
            scores=np.asarray(row["scores"], np.float32).reshape(-1, num_classes),
            box_score=row["box_score"],
            masks=[{"size": [h, w], "counts": bytes(c)} for c in counts],
            mask_score=row["mask_score"],
            iscrowd=np.asarray(row["iscrowd"], bool),
            error=row["error"],
        )


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows from :meth:`LabelRecord.to_row` as an Arrow table of :data:`ROW_SCHEMA`."""
    cols = {f.name: [r[f.name] for r in rows] for f in ROW_SCHEMA}
    for name in ("boxes", "scores", "box_score", "mask_score", "iscrowd"):
        cols[name] = [np.asarray(v).tolist() for v in cols[name]]
    return pa.Table.from_pydict(cols, schema=ROW_SCHEMA)
