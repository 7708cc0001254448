"""Mask -> polygon: the one conversion behind YOLO-seg label files and training targets,
read back by both rasterisers that consume it (pycocotools, ultralytics' polygon2mask)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from ultralytics.data.utils import polygon2mask

from distillery.engine.polygons import mask_to_polygon

H, W = 48, 64


def coco_raster(poly: np.ndarray) -> np.ndarray:
    rle = mask_utils.frPyObjects([poly.reshape(-1).astype(float).tolist()], H, W)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def ultralytics_raster(poly: np.ndarray) -> np.ndarray:
    return polygon2mask((H, W), [poly.reshape(-1)]).astype(bool)


def shapes() -> dict:
    yy, xx = np.mgrid[:H, :W]
    d2 = (xx - 20) ** 2 + (yy - 22) ** 2
    out = {"rectangle": np.zeros((H, W), bool), "pixel": np.zeros((H, W), bool), "line": np.zeros((H, W), bool),
           "corner": np.zeros((H, W), bool), "disk": d2 <= 15**2, "ring": (d2 <= 15**2) & (d2 >= 7**2),
           "two_parts": np.zeros((H, W), bool)}
    out["rectangle"][5:15, 5:25] = True
    out["pixel"][30, 40] = True
    out["line"][40, 10:50] = True  # one pixel high
    out["corner"][H - 6:, W - 9:] = True  # touches the image border
    out["two_parts"][2:12, 40:60] = True
    out["two_parts"][20:40, 45:62] = True
    return out


@pytest.mark.parametrize("name", list(shapes()))
def test_polygon_rasterises_back_to_the_mask_in_pycocotools(name):
    """COCO's rasteriser gives back exactly the mask: parts, holes, single pixels, 1 px lines."""
    m = shapes()[name]
    poly = mask_to_polygon(m)
    assert poly.dtype == np.float32 and poly.shape[1] == 2 and len(poly) >= 4
    np.testing.assert_array_equal(coco_raster(poly), m)


@pytest.mark.parametrize("name", ["rectangle", "pixel", "line", "corner", "disk"])
def test_single_outline_rasterises_back_exactly_in_ultralytics(name):
    """ultralytics' training rasteriser (int truncation + cv2.fillPoly) gives back the mask too."""
    m = shapes()[name]
    np.testing.assert_array_equal(ultralytics_raster(mask_to_polygon(m)), m)


@pytest.mark.parametrize("name", ["ring", "two_parts"])
def test_keyhole_polygon_keeps_holes_and_parts_in_ultralytics(name):
    """cv2.fillPoly may fill pixels along the zero-width bridge, nothing else: the hole stays
    open and every part is whole."""
    m = shapes()[name]
    r = ultralytics_raster(mask_to_polygon(m))
    assert not (m & ~r).any()  # nothing lost
    assert (r & ~m).sum() <= 0.03 * m.sum(), (r & ~m).sum()  # the bridge at most
    if name == "ring":
        assert not r[22, 20]  # centre of the hole


def test_rectangle_vertices_lie_a_quarter_pixel_outside_the_boundary_pixel_centres():
    m = shapes()["rectangle"]  # rows 5..14, cols 5..24; pixel j's centre is j + 0.5
    poly = mask_to_polygon(m)
    np.testing.assert_allclose(sorted(set(poly[:, 0].tolist())), [5.25, 24.75])
    np.testing.assert_allclose(sorted(set(poly[:, 1].tolist())), [5.25, 14.75])


def test_empty_and_bad_shape():
    assert mask_to_polygon(np.zeros((5, 5), bool)).shape == (0, 2)
    with pytest.raises(ValueError, match=r"one \(H, W\) mask"):
        mask_to_polygon(np.zeros((2, 5, 5), bool))
