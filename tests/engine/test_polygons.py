"""Mask -> polygon: the one conversion behind YOLO-seg label files and training targets,
read back by both rasterisers that consume it (pycocotools, ultralytics' polygon2mask), exact
(``tolerance=0``) and simplified with a bounded error (the default, 0.5 px)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from ultralytics.data.utils import polygon2mask

from distillery.engine.polygons import TOLERANCE, mask_to_polygon
from distillery.labeling.segmenter import remove_small_regions

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
def test_exact_polygon_rasterises_back_to_the_mask_in_pycocotools(name):
    """COCO's rasteriser gives back exactly the mask: parts, holes, single pixels, 1 px lines."""
    m = shapes()[name]
    poly = mask_to_polygon(m, tolerance=0)
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


def test_empty_and_bad_input():
    assert mask_to_polygon(np.zeros((5, 5), bool)).shape == (0, 2)
    with pytest.raises(ValueError, match=r"one \(H, W\) mask"):
        mask_to_polygon(np.zeros((2, 5, 5), bool))
    with pytest.raises(ValueError, match="tolerance must be a finite number of px >= 0, got -1"):
        mask_to_polygon(np.ones((5, 5), bool), tolerance=-1)


def sam_like_ragged_mask(seed: int = 0, h: int = 480, w: int = 640, noise: float = 0.6) -> np.ndarray:
    """A ragged mask the way SAM makes one: low-resolution logits (one cell per 2.5 px, as SAM's
    256x256 logits over its 1024 input of a 640 px photo), bilinearly upsampled, thresholded at
    0. An ellipse plus Gaussian noise per cell gives a frayed outline, ~700 specks and pinholes."""
    rng = np.random.default_rng(seed)
    gh, gw = h * 2 // 5, w * 2 // 5
    yy, xx = np.mgrid[:gh, :gw]
    logit = 1.0 - ((xx / gw - 0.5) / 0.3) ** 2 - ((yy / gh - 0.5) / 0.25) ** 2 + rng.normal(0, noise, (gh, gw))
    return cv2.resize(logit.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) > 0


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _dist_to_polygon(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Distance of each point to the closed polyline ``poly`` (float64)."""
    a, b = poly.astype(np.float64), np.roll(poly, -1, 0).astype(np.float64)
    ab = b - a
    best = np.full(len(points), np.inf)
    for s in range(0, len(points), 256):
        p = points[s:s + 256, None, :].astype(np.float64)
        t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
        best[s:s + 256] = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(1)
    return best


@pytest.mark.parametrize("tolerance", [0.5, 1.0])
@pytest.mark.parametrize("name", ["disk", "ring", "two_parts", "ragged"])
def test_every_exact_vertex_lies_within_tolerance_of_the_simplified_polygon(name, tolerance):
    """Douglas-Peucker's bound, checked: the simplified polygon strays from the exact outline by at
    most ``tolerance`` px (plus float32 rounding)."""
    m = sam_like_ragged_mask(h=120, w=160) if name == "ragged" else shapes()[name]
    exact, simple = mask_to_polygon(m, tolerance=0), mask_to_polygon(m, tolerance=tolerance)
    d = _dist_to_polygon(exact, simple)
    assert d.max() <= tolerance + 1e-4, d.max()
    assert len(simple) < len(exact) if name != "two_parts" else len(simple) == len(exact)  # rectangles: nothing to drop


def test_ragged_mask_round_trips_at_iou_099_with_far_fewer_vertices():
    """SAM-like ragged mask -> SAM's clean-up at the default 100 px -> polygon at 0.5 px ->
    pycocotools: IoU >= 0.99 with the cleaned mask; measured 0.9943 with 3,146 vertices, where
    the raw mask's exact polygon had 28,138 (726 parts) and the raw mask simplified alone 14,219
    (IoU 0.9839: the specks keep their exact outlines)."""
    raw = sam_like_ragged_mask()
    clean = remove_small_regions(raw, 100)
    n_parts = cv2.connectedComponents(raw.astype(np.uint8), connectivity=8)[0] - 1
    exact_raw, simple_raw = mask_to_polygon(raw, tolerance=0), mask_to_polygon(raw)
    simple = mask_to_polygon(clean)
    iou = _iou(coco_raster_hw(simple, *raw.shape), clean)
    iou_raw = _iou(coco_raster_hw(simple_raw, *raw.shape), raw)
    print(f"\nragged mask: {n_parts} parts; vertices exact {len(exact_raw)}, simplified {len(simple_raw)} "
          f"(IoU {iou_raw:.4f}), cleaned + simplified {len(simple)} (IoU {iou:.4f})")
    assert n_parts >= 500
    assert iou >= 0.99 and iou_raw >= 0.98
    assert len(simple) * 8 <= len(exact_raw) and len(simple_raw) * 1.8 <= len(exact_raw)


def coco_raster_hw(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    rle = mask_utils.frPyObjects([poly.reshape(-1).astype(float).tolist()], h, w)
    return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def test_coco128_gt_masks_round_trip_at_iou_099(coco128_gt):
    """Every non-crowd coco128 GT mask (pycocotools' own rasterisation of the GT polygons) ->
    polygon at the default tolerance -> pycocotools. Measured: 518 masks >= 1000 px mean IoU
    0.9967 (min 0.9741), 411 smaller ones 0.9820; 2.6x fewer vertices than the exact outlines."""
    images = {im["id"]: im for im in coco128_gt["images"]}
    big, small, n_exact, n_simple = [], [], 0, 0
    for a in coco128_gt["annotations"]:
        if a["iscrowd"]:
            continue
        h, w = images[a["image_id"]]["height"], images[a["image_id"]]["width"]
        m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))).astype(bool)
        poly = mask_to_polygon(m)
        n_exact, n_simple = n_exact + len(mask_to_polygon(m, tolerance=0)), n_simple + len(poly)
        (big if m.sum() >= 1000 else small).append(_iou(coco_raster_hw(poly, h, w), m))
    big, small = np.array(big), np.array(small)
    print(f"\ncoco128 GT at {TOLERANCE} px: {len(big)} masks >= 1000 px mean IoU {big.mean():.4f} (min {big.min():.4f}), "
          f"{len(small)} smaller mean {small.mean():.4f}; vertices {n_exact} -> {n_simple}")
    assert len(big) == 518 and len(small) == 411
    assert big.mean() >= 0.995 and big.min() >= 0.97 and small.mean() >= 0.98
    assert n_simple * 2.5 <= n_exact


def test_scaled_trace_lands_in_the_mask_frame():
    """``scale``: the outline is traced on the resized mask and mapped back: a 300x200 rectangle at
    scale 0.25 (4 px per traced pixel) has its corners within one traced pixel of the true ones
    and rasterises back (pycocotools) at IoU >= 0.98; a mask too small to survive the resize is
    traced at full size; a scale outside (0, 1] is refused."""
    m = np.zeros((480, 640), bool)
    m[100:300, 200:500] = True
    poly = mask_to_polygon(m, scale=0.25)
    np.testing.assert_allclose([*poly.min(0), *poly.max(0)], [200, 100, 500, 300], atol=4)
    assert _iou(coco_raster_hw(poly, 480, 640), m) >= 0.98
    np.testing.assert_array_equal(mask_to_polygon(m, scale=1.0), mask_to_polygon(m))
    diagonal = np.zeros((480, 640), bool)
    diagonal[np.arange(10, 18), np.arange(20, 28)] = True  # its 8x8 box is one pixel at 1/8, 1/8 covered
    np.testing.assert_array_equal(mask_to_polygon(diagonal, scale=0.125), mask_to_polygon(diagonal))
    disk = cv2.circle(np.zeros((300, 400), np.uint8), (200, 150), 97, 1, -1)
    for other in (disk * 255, disk.astype(bool), disk.astype(np.float32) * 2.5):  # any non-zero is inside
        np.testing.assert_array_equal(mask_to_polygon(other, scale=0.1), mask_to_polygon(disk, scale=0.1))
    for bad in (0.0, 1.5, float("nan"), "half", None):
        with pytest.raises(ValueError, match="scale"):
            mask_to_polygon(m, scale=bad)
