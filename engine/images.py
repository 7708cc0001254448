"""Image sources and decoding (Pillow, EXIF orientation applied).

Every path handed to the engine ends as exactly one label record: decoded pixels, or an
error record with the reason. Nothing here raises for a bad *image*; bad *sources*
(a missing folder, an unreadable list file) raise :class:`SourceError` before any work.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: File suffixes searched for when a source is a folder (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

#: Default pixel limit (width * height after decoding header). 64 MP covers 8K (33 MP) and
#: most camera RAW-converted JPEGs; larger inputs are error records, not OOM kills.
DEFAULT_MAX_PIXELS = 64_000_000


class SourceError(ValueError):
    """A source (folder, list file, COCO JSON) does not exist or cannot be parsed."""


def list_source(source: str | os.PathLike) -> list[str]:
    """Image paths named by one source, sorted for folders, in file order otherwise.

    Args:
        source: a folder (searched recursively for :data:`IMAGE_SUFFIXES`, case-insensitive),
            a text file with one image path per line (relative paths are relative to the
            file's folder; blank lines and ``#`` comments skipped), or a COCO JSON file
            (its ``images[].file_name``, relative to the JSON's folder or to an ``images/``
            folder beside it).

    Returns:
        Absolute paths as strings. Paths that do not exist are returned too: they become
        error records, so the user sees them in the summary.

    Raises:
        SourceError: the source does not exist, a JSON source is not COCO, a list is not
            UTF-8 text, or a list or JSON source names paths of which none exists (a wrong
            file, or paths relative to another folder).
    """
    p = Path(source).expanduser()
    if p.is_dir():
        found = [
            # broken symlinks are kept: they become "missing" error records, not silent gaps
            str(f.absolute()) for f in p.rglob("*")
            if f.suffix.lower() in IMAGE_SUFFIXES and (f.is_file() or (f.is_symlink() and not f.exists()))
        ]
        return sorted(found)
    if not p.is_file():
        raise SourceError(f"source {str(p)!r} does not exist: give a folder, a .txt list of paths or a COCO .json")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text())
            names = [im["file_name"] for im in data["images"]]
        except (ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{p}: not a COCO JSON with images[].file_name ({e})") from e
        base = p.parent / "images" if (p.parent / "images").is_dir() else p.parent
        return _some_exist(p, [str(n if os.path.isabs(n) else (base / n).absolute()) for n in names])
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return [str(p.absolute())]
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SourceError(f"{p}: a list source must be UTF-8 text with one image path per line") from e
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            q = Path(line).expanduser()
            out.append(str(q if q.is_absolute() else (p.parent / q).absolute()))
    return _some_exist(p, out)


def _some_exist(source: Path, paths: list[str]) -> list[str]:
    """``paths``, unless there are some and none exists (broken symlinks count as existing)."""
    if paths and not any(os.path.lexists(q) for q in paths):
        raise SourceError(f"source {source} names {len(paths)} image path(s) but none exists (the first: {paths[0]}); "
                          "give a folder, a .txt list of image paths (relative to the list's folder) or a COCO .json")
    return paths


def list_sources(sources) -> list[str]:
    """:func:`list_source` over several sources, duplicates (same path) removed, order kept."""
    seen, out = set(), []
    for s in sources:
        for path in list_source(s):
            if path not in seen:
                seen.add(path)
                out.append(path)
    return out


def content_id(data: bytes) -> str:
    """sha256 hex digest of a file's bytes: the label record's ``image_id``."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class Decoded:
    """One image after decoding: ``pixels`` is uint8 ``(height, width, 3)`` RGB, EXIF-corrected;
    ``pixels is None`` and ``error`` set when the file could not be used."""

    path: str
    image_id: str
    width: int
    height: int
    pixels: np.ndarray | None
    error: str | None = None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB.

    16-bit and 32-bit integer grayscale (``I;16*``, ``I``) is scaled by 1/256 (16-bit full
    range to 8-bit), float (``F``) is clipped to [0, 255]; CMYK, palette, LA and RGBA go
    through Pillow's ``convert("RGB")``. Alpha is dropped, not composited, as OpenCV's
    ``imread`` does: teachers and the ultralytics student then see the same pixels.
    """
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "I" and arr.max(initial=0) <= 255:
            arr8 = arr
        else:
            arr8 = arr / 256.0
        im = Image.fromarray(np.clip(arr8, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


#: EXIF orientations (tag 0x0112) that swap width and height (transpose, rotate 90/270, transverse).
SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def display_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened, not yet loaded image as displayed: after its EXIF
    orientation, i.e. the size of ``ImageOps.exif_transpose(im)``; read from the header only.

    The one rule for every format, so that ``label`` (:func:`decode`), ``labels import``, the
    student's size check and ultralytics' ``imread`` agree: the *stored* size, swapped when the
    EXIF orientation is 5-8. Pillow's ``size`` is not the stored size for every format: its TIFF
    plugin (Pillow 13.0, checked) already reports the rotated size at open and rotates on
    ``load()`` (older releases did neither), so for TIFF the stored size is read from the
    ImageWidth/ImageLength tags (256/257), which mean the same in every release. HEIF/AVIF via
    pi-heif report the displayed size and reset the orientation to 1.
    """
    tags = getattr(im, "tag_v2", None) if im.format == "TIFF" else None
    if tags is not None and isinstance(tags.get(256), int) and isinstance(tags.get(257), int):
        stored = (tags[256], tags[257])
        orientation = tags.get(0x0112, 1)
    else:
        stored = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block means no orientation, as in exif_transpose
            orientation = 1
    return (stored[1], stored[0]) if orientation in SWAPPING_ORIENTATIONS else stored


def exif_size(path: str) -> tuple[int, int]:
    """(width, height) of the image file at ``path`` after EXIF orientation (:func:`display_size`),
    header only, no pixel decode. Raises Pillow's errors for files it cannot open."""
    with Image.open(path) as im:
        return display_size(im)


def decode(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Read, hash and decode one image; never raises for a bad file.

    Returns:
        :class:`Decoded` with RGB uint8 ``(height, width, 3)`` pixels after
        ``PIL.ImageOps.exif_transpose``; or ``pixels=None`` and an ``error`` of the form
        ``"<kind>: <detail>"`` where kind is one of ``missing``, ``unreadable``, ``empty``,
        ``not-an-image``, ``truncated``, ``too-large``, ``decode-failed``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Decoded(path, "", 0, 0, None, "missing: file not found")
    except IsADirectoryError:
        return Decoded(path, "", 0, 0, None, "unreadable: a directory, not an image (list image files, or give the folder as a source)")
    except OSError as e:
        return Decoded(path, "", 0, 0, None, f"unreadable: {e.strerror or e}")
    image_id = content_id(data)
    if not data:
        return Decoded(path, image_id, 0, 0, None, "empty: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            dw, dh = display_size(im)
            w, h = im.size
            if w * h > max_pixels:
                return Decoded(
                    path, image_id, w, h, None,
                    f"too-large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels} (rerun with a larger --max-pixels to label it)",
                )
            im.load()
    except UnidentifiedImageError:
        return Decoded(path, image_id, 0, 0, None, "not-an-image: Pillow cannot identify the format")
    except Image.DecompressionBombError as e:
        return Decoded(path, image_id, 0, 0, None, f"too-large: {e}")
    except Image.DecompressionBombWarning as e:
        return Decoded(path, image_id, 0, 0, None, f"too-large: {e}")
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        low = msg.lower()
        kind = "truncated" if "truncat" in low or "broken data stream" in low else "decode-failed"
        return Decoded(path, image_id, 0, 0, None, f"{kind}: {msg}")
    try:
        im = ImageOps.exif_transpose(im)
        pixels = np.asarray(to_rgb(im), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes an error record
        return Decoded(path, image_id, 0, 0, None, f"decode-failed: {type(e).__name__}: {e}")
    h, w = pixels.shape[:2]
    if (w, h) != (dw, dh):  # Pillow's reader and display_size disagree: the size would be wrong somewhere
        return Decoded(path, image_id, 0, 0, None, f"decode-failed: pixels decoded as {w}x{h} but the header with its EXIF "
                       f"orientation says {dw}x{dh}; convert the file to PNG or JPEG")
    return Decoded(path, image_id, w, h, np.ascontiguousarray(pixels))


def error_kind(error: str) -> str:
    """The reason kind of an error string (text before the first colon)."""
    return error.split(":", 1)[0]


#: Error kinds a rerun tries again (the file may have been fixed, or ``max_pixels``
#: raised); ``duplicate`` is a resolved state, not a failure, and is kept.
RETRYABLE_ERRORS = frozenset(
    {"missing", "unreadable", "empty", "not-an-image", "truncated", "too-large", "decode-failed"}
)
