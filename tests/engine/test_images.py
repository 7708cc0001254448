from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from distillery.engine.images import SourceError, content_id, decode, list_source, list_sources, to_rgb


@pytest.fixture
def photo(coco128):
    return coco128 / "images" / "000000000009.jpg"


def test_bad_files_become_error_records(tmp_path, photo):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    data = photo.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    cases = {
        "empty.jpg": "empty",
        "text.jpg": "not-an-image",
        "truncated.jpg": "truncated",
        "missing.jpg": "missing",
    }
    for name, kind in cases.items():
        d = decode(str(tmp_path / name))
        assert d.pixels is None and d.error.split(":")[0] == kind, (name, d.error)
    big = decode(str(tmp_path / "big.png"), max_pixels=300 * 200 - 1)
    assert big.pixels is None and big.error.startswith("too-large") and "max_pixels" in big.error
    ok = decode(str(tmp_path / "big.png"), max_pixels=300 * 200)
    assert ok.error is None and ok.pixels.shape == (200, 300, 3)


def test_unreadable_file(tmp_path):
    p = tmp_path / "noperm.jpg"
    p.mkdir()  # a directory named like an image: open() fails with an OSError
    d = decode(str(p))
    assert d.error.startswith("unreadable")


def test_same_bytes_same_id_and_odd_paths(tmp_path, photo):
    odd = tmp_path / "dir with space" / "fotografía ñ.jpg"
    odd.parent.mkdir()
    odd.write_bytes(photo.read_bytes())
    a, b = decode(str(photo)), decode(str(odd))
    assert a.image_id == b.image_id == content_id(photo.read_bytes())
    assert np.array_equal(a.pixels, b.pixels)
    assert list_source(tmp_path) == [str(odd)]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "I;16", "I", "1"])
def test_modes_convert_to_rgb(tmp_path, photo, mode):
    rgb = Image.open(photo).convert("RGB").resize((64, 48))
    if mode == "I;16":
        arr16 = np.asarray(rgb.convert("L"), np.uint16) * 257  # full 16-bit range
        im = Image.fromarray(arr16)
        path = tmp_path / "x.png"
    elif mode == "I":
        im = rgb.convert("L").convert("I")
        path = tmp_path / "x.tif"
    else:
        im = rgb.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    d = decode(str(path))
    assert d.error is None, d.error
    assert d.pixels.dtype == np.uint8 and d.pixels.shape == (48, 64, 3)
    if mode in ("I;16", "I", "L"):
        ref = np.asarray(rgb.convert("L"), int)
        assert np.abs(d.pixels[..., 0].astype(int) - ref).mean() < 2.5, "grayscale levels not preserved"


def test_16bit_scaling():
    arr = np.array([[0, 256, 65535]], np.uint16)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    out = np.asarray(to_rgb(im))
    assert out[0, :, 0].tolist() == [0, 1, 255]


def test_sources(tmp_path, coco128):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{coco128 / 'images' / '000000000009.jpg'}\n\nrel.jpg\n")
    paths = list_source(lst)
    assert paths == [str(coco128 / "images" / "000000000009.jpg"), str(tmp_path / "rel.jpg")]
    coco = list_source(coco128 / "annotations.json")
    assert len(coco) == 128 and all(p.startswith(str(coco128 / "images")) for p in coco)
    both = list_sources([lst, coco128 / "annotations.json"])
    assert len(both) == 129  # 000000000009.jpg listed twice, kept once
    with pytest.raises(SourceError, match="does not exist"):
        list_source(tmp_path / "nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": 1}))
    with pytest.raises(SourceError, match="not a COCO JSON"):
        list_source(bad)


def test_broken_symlink_is_listed_and_recorded_missing(tmp_path, photo):
    (tmp_path / "ok.jpg").symlink_to(photo)
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    paths = list_source(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["broken.jpg", "ok.jpg"]
    assert decode(paths[0]).error.startswith("missing")
    assert decode(paths[1]).error is None


def test_garbage_file_is_an_error_record_even_after_ultralytics_is_imported(tmp_path):
    """ultralytics patches PIL.Image.open (HEIF plugin on the first unidentified file)."""
    import ultralytics.utils.patches  # noqa: F401

    from distillery.engine.images import decode

    p = tmp_path / "garbage.jpg"
    p.write_bytes(b"definitely not an image" * 20)
    assert decode(str(p)).error.startswith("not-an-image")
