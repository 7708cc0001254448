"""EXIF orientation: one displayed size for every format, and every reader agrees on it.

Each case writes a small image (stored 60 wide x 30 high, a red block at the stored top-left,
a blue block at the stored bottom-right) with EXIF orientation 1-8, and compares what each
reader returns against ``ImageOps.exif_transpose`` applied to the in-memory image (which is
itself checked against the EXIF specification's transform table).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from distillery.engine.images import decode, exif_size

W, H = 60, 30
RED, BLUE = (255, 0, 0), (0, 0, 255)

# EXIF 2.32, tag 0x0112: how the stored rows/columns map to the displayed image
SPEC = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1)}

FORMATS = {  # name: (Pillow format, suffix, save options, lossless)
    "jpeg": ("JPEG", ".jpg", {"quality": 95}, False),
    "png": ("PNG", ".png", {}, True),
    "webp": ("WEBP", ".webp", {"lossless": True}, True),
    "tiff": ("TIFF", ".tif", {}, True),
    "tiff-lzw": ("TIFF", ".tif", {"compression": "tiff_lzw"}, True),
    "tiff-gray": ("TIFF", ".tif", {}, True),
    "heic": ("HEIF", ".heic", {}, False),
}


def stored() -> np.ndarray:
    a = np.full((H, W, 3), 128, np.uint8)
    a[:8, :12] = RED
    a[-8:, -12:] = BLUE
    return a


def ground_truth(fmt: str, orientation: int) -> np.ndarray:
    im = Image.fromarray(stored())
    if fmt == "tiff-gray":
        im = im.convert("L").convert("RGB")
    im.getexif()[0x0112] = orientation
    truth = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(truth, SPEC[orientation](np.asarray(im)))  # Pillow's table is the spec's
    return truth


def write(tmp_path, fmt: str, orientation: int):
    pil_format, suffix, options, lossless = FORMATS[fmt]
    im = Image.fromarray(stored())
    if fmt == "tiff-gray":
        im = im.convert("L")
    if fmt == "heic":
        import pi_heif

        if not pi_heif.libheif_info()["encoders"].get("HEVC") and "x265" not in str(pi_heif.libheif_info()["encoders"]):
            pytest.skip("pi-heif here has HEIF decoders only (libheif_info()['encoders'] has no HEVC encoder): "
                        "no HEIC test file can be written")
        pi_heif.register_heif_opener()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}{suffix}"
    im.save(path, format=pil_format, exif=exif.tobytes(), **options)
    with Image.open(path) as check:  # the file carries the orientation we meant
        tags = check.tag_v2 if pil_format == "TIFF" else check.getexif()
        assert tags.get(0x0112) == orientation
    return path, lossless


def red_centre(orientation: int) -> tuple[int, int]:
    """(row, column) of the red block's centre in the displayed image (from the spec table)."""
    marker = np.zeros((H, W, 1), np.uint8)
    marker[3:5, 5:7] = 1  # the centre of the block a[:8, :12]
    ys, xs, _ = np.nonzero(SPEC[orientation](marker))
    return int(ys[0]), int(xs[0])


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_reader_shows_the_exif_transposed_image(tmp_path, fmt, orientation):
    from ultralytics.data.utils import exif_size as ultralytics_exif_size
    from ultralytics.utils.patches import imread

    path, lossless = write(tmp_path, fmt, orientation)
    truth = ground_truth(fmt, orientation)
    th, tw = truth.shape[:2]
    assert (tw, th) == ((H, W) if orientation >= 5 else (W, H))

    assert exif_size(str(path)) == (tw, th)  # header only: import's size
    d = decode(str(path))  # label's pixels
    assert d.error is None and (d.width, d.height) == (tw, th)
    ours = d.pixels
    theirs = imread(str(path))[..., ::-1]  # ultralytics' reader (BGR): what the student trains on
    with Image.open(path) as im:
        assert ultralytics_exif_size(im) == (tw, th)  # ultralytics' label check
    y, x = red_centre(orientation)
    assert np.abs(truth[y, x].astype(int) - np.asarray(Image.new("RGB", (1, 1), RED).convert(
        "L" if fmt == "tiff-gray" else "RGB").convert("RGB"))[0, 0]).max() < 40
    for name, got in (("decode", ours), ("ultralytics imread", theirs)):
        assert got.shape == truth.shape, name
        err = np.abs(got.astype(int) - truth.astype(int))
        assert (err.max() == 0) if lossless else (err.mean() < 6), (name, err.mean())
        assert np.abs(got[y, x].astype(int) - truth[y, x]).max() < 40, (name, got[y, x], truth[y, x])


def test_rotated_tiff_imports_and_trains_at_its_displayed_size(tmp_path):
    """A TIFF with orientation 6 labeled at its displayed 30x60 imports without a size mismatch,
    and the student's dataset loads it with the labels in place."""
    from ultralytics.cfg import get_cfg

    from distillery.engine.store import LabelStore
    from distillery.labeling.coco import import_coco
    from distillery.student.data import Selection, StoreSegDataset, build_table

    path, _ = write(tmp_path, "tiff", 6)
    y, x = red_centre(6)
    coco = {"images": [{"id": 1, "file_name": path.name, "width": H, "height": W}],
            "categories": [{"id": 1, "name": "block"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [x - 4, y - 6, 8, 12],
                             "segmentation": [[x - 4, y - 6, x + 4, y - 6, x + 4, y + 6, x - 4, y + 6]]}]}
    (tmp_path / "gt.json").write_text(json.dumps(coco))
    ls, stats = import_coco(LabelStore(tmp_path / "store"), str(tmp_path / "gt.json"), str(tmp_path))
    assert stats["errors"] == 0
    rec = next(ls.iter_records())
    assert (rec.width, rec.height) == (H, W)
    table = build_table(ls, Selection(val_fraction=0.0, curation=0))
    ds = StoreSegDataset(img_path="", imgsz=64, augment=False, hyp=get_cfg(), rect=False, batch_size=1,
                         data={"names": {0: "block"}, "nc": 1, "channels": 3}, task="segment", table=table,
                         split="train", pad=0.0)
    item = ds[0]
    assert tuple(item["ori_shape"]) == (W, H)
    assert len(item["cls"]) == 1
