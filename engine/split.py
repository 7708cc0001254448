"""Deterministic train/val split shared by every stage (YOLO export, student training)."""

from __future__ import annotations

import hashlib


def is_val(image_id: str, val_fraction: float) -> bool:
    """True (val) when the first 32 bits of sha256(``image_id``), as a fraction of 2**32 - 1,
    fall below ``val_fraction``: the same image is in the same split in every run and stage."""
    h = int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < val_fraction
