"""Where the first labeled row of each image content lives: 12 bytes per image in memory.

The label set writer turns an image whose bytes were already labeled under another path
into a ``duplicate`` error row that names the first path. Keeping ``image_id -> path`` in a
dict costs about 250 bytes per image (two strings of 64 and ~60 characters, plus a hash
table slot), which grows without bound in the driver. This index keeps only, per labeled
image, a 64-bit key of its ``image_id`` (``uint64``, 8 bytes) and the ordinal of the shard
that holds its first row (``int32``, 4 bytes), in two sorted numpy arrays; the path itself
stays on disk and is read back from that one shard (at most ``shard_size`` rows) when a
duplicate is found. Keys that collide (two ids with the same 64-bit key) are kept side by
side and told apart by the shard lookup, so answers are exact.

New keys wait in a small dict (about 100 bytes per key) that is merged into the main arrays
(``np.searchsorted`` + ``np.insert``, O(n)) when it exceeds ``max(4096, n / 32)``
entries, so inserts cost O(1) amortised copies per key and the buffer adds at most about
3 bytes per indexed image. A bound independent of the number of images is impossible for an
exact answer; this is the measured cost instead (``tests/engine/test_store.py``).
"""

from __future__ import annotations

import hashlib

import numpy as np


def content_key(image_id: str) -> int:
    """64-bit key of an ``image_id``: the first 8 bytes of its BLAKE2b digest, as an unsigned int
    (any string id works, not only the sha256 hex ids of :func:`distillery.engine.images.content_id`)."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little")


class ContentIndex:
    """Multimap ``content_key(image_id) -> shard ordinal`` in sorted numpy arrays.

    Memory: 12 bytes per entry in the merged arrays (``nbytes``), plus a merge buffer of at
    most ``max(4096, n / 32)`` keys.
    """

    MIN_BUFFER = 4096

    def __init__(self) -> None:
        self._keys = np.empty(0, np.uint64)
        self._shards = np.empty(0, np.int32)
        self._buf: dict[int, list[int]] = {}
        self._buffered = 0

    def __len__(self) -> int:
        return len(self._keys) + self._buffered

    @property
    def nbytes(self) -> int:
        """Bytes held by the merged arrays (the buffer is merged first)."""
        self._merge()
        return self._keys.nbytes + self._shards.nbytes

    def add(self, image_ids, shard: int) -> None:
        """Record that the first labeled row of each of ``image_ids`` is in shard ``shard``."""
        for i in image_ids:
            self._buf.setdefault(content_key(i), []).append(shard)
            self._buffered += 1
        if self._buffered > max(self.MIN_BUFFER, len(self._keys) // 32):
            self._merge()

    def shards_of(self, image_id: str) -> list[int]:
        """Ordinals of the shards that may hold ``image_id``'s first labeled row, oldest first
        (empty: never labeled; more than one only on a 64-bit key collision)."""
        k = content_key(image_id)
        lo = np.searchsorted(self._keys, np.uint64(k), side="left")
        hi = np.searchsorted(self._keys, np.uint64(k), side="right")
        return sorted(set(self._shards[lo:hi].tolist() + self._buf.get(k, [])))

    def _merge(self) -> None:
        if not self._buf:
            return
        keys = np.array([k for k, ss in self._buf.items() for _ in ss], np.uint64)
        shards = np.array([s for ss in self._buf.values() for s in ss], np.int32)
        order = np.argsort(keys, kind="stable")
        keys, shards = keys[order], shards[order]
        at = np.searchsorted(self._keys, keys, side="right")
        self._keys = np.insert(self._keys, at, keys)
        self._shards = np.insert(self._shards, at, shards)
        self._buf, self._buffered = {}, 0
