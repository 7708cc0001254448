"""SAM's small-region clean-up in the segmenter: the library's result on a crop, the preset key,
and its place in the label set's fingerprint."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import remove_small_regions as sam_remove_small_regions

from distillery.engine.images import decode
from distillery.labeling.ontology import Ontology
from distillery.labeling.segmenter import MIN_REGION_AREA, SamTeacher, remove_small_regions
from distillery.labeling.teachers import TeacherPreset, labelset_spec


def sam_full_frame(mask: np.ndarray, area: int) -> np.ndarray:
    """segment-anything's clean-up on the whole frame, holes then islands (its automatic mask generator's order)."""
    m, _ = sam_remove_small_regions(mask, area, "holes")
    return sam_remove_small_regions(m, area, "islands")[0]


def cases() -> dict:
    rng = np.random.default_rng(0)
    h, w = 90, 120
    noisy = cv2.resize(rng.normal(0, 1, (36, 48)).astype(np.float32), (w, h)) > 0.3  # many specks and pinholes
    out = {"noisy": noisy, "noisy_centre": np.zeros((h, w), bool), "pixel": np.zeros((h, w), bool),
           "line_across": np.zeros((h, w), bool), "corner_pocket": np.zeros((h, w), bool),
           "small_only": np.zeros((h, w), bool), "empty": np.zeros((h, w), bool)}
    out["noisy_centre"][30:60, 40:80] = noisy[30:60, 40:80]
    out["pixel"][45, 60] = True
    out["line_across"][40, :] = True  # splits the background in two: both must stay background
    out["corner_pocket"][:20, :30] = True
    out["corner_pocket"][:3, :4] = False  # a 12 px pocket on the frame border: a hole by SAM's rule
    out["small_only"][5:8, 5:8] = True  # every island small: SAM keeps the largest
    out["small_only"][50:52, 50:52] = True
    return out


@pytest.mark.parametrize("area", [1, 20, 100, 400])
@pytest.mark.parametrize("name", list(cases()))
def test_clean_up_on_the_grown_box_equals_sams_full_frame(name, area):
    m = cases()[name]
    got = remove_small_regions(m, area)
    np.testing.assert_array_equal(got, sam_full_frame(m, area))
    assert got.dtype == bool and got is not m


def test_segmenter_cleans_its_masks_and_the_preset_key_reaches_the_fingerprint(tiny_teachers, coco128):
    preset = TeacherPreset.load(tiny_teachers)
    s = preset.segmenter
    assert s.min_region_area == MIN_REGION_AREA == 100  # the default, when the preset does not say
    image = decode(str(coco128 / "images" / "000000000009.jpg")).pixels
    boxes = np.array([[10, 20, 200, 180], [300, 100, 600, 400]], np.float32)
    raw = SamTeacher(s.model_type, s.checkpoint, device="cpu", min_region_area=0)(image, boxes)
    clean = SamTeacher(s.model_type, s.checkpoint, device="cpu")(image, boxes)
    np.testing.assert_array_equal(raw[1], clean[1])  # SAM's predicted IoU is the raw mask's
    for r, c in zip(mask_utils.decode(raw[0]).transpose(2, 0, 1), mask_utils.decode(clean[0]).transpose(2, 0, 1)):
        np.testing.assert_array_equal(c.astype(bool), sam_full_frame(r.astype(bool), 100))
        parts = [cv2.connectedComponentsWithStats(x, connectivity=8)[2][1:, -1] for x in (r, c)]
        assert len(parts[0]) > 10 * len(parts[1]) and parts[1].min() >= 100  # random SAM: thousands of specks
    onto = Ontology.from_classes("cat,dog")
    spec = labelset_spec(onto, preset)
    assert spec["thresholds"]["min_region_area"] == 100
    preset.segmenter.min_region_area = 0
    assert labelset_spec(onto, preset)["thresholds"]["min_region_area"] == 0
    with pytest.raises(ValueError, match="min_region_area must be >= 0 px, got -5"):
        SamTeacher(s.model_type, s.checkpoint, device="cpu", min_region_area=-5)


def test_default_clean_up_on_coco128_gt_masks(coco128_gt):
    """What the default costs on human masks: fragments of occluded objects under 100 px go.
    Measured over the 929 non-crowd coco128 GT masks: 60 change, mean IoU 0.9936, min 0.5000 (a
    small two-part mask), 4 masks of >= 400 px under 0.95 (min 0.8545)."""
    images = {im["id"]: im for im in coco128_gt["images"]}
    ious, areas = [], []
    for a in coco128_gt["annotations"]:
        if a["iscrowd"]:
            continue
        h, w = images[a["image_id"]]["height"], images[a["image_id"]]["width"]
        m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))).astype(bool)
        c = remove_small_regions(m, MIN_REGION_AREA)
        ious.append((m & c).sum() / (m | c).sum()), areas.append(m.sum())
    ious, areas = np.array(ious), np.array(areas)
    print(f"\ncoco128 GT, clean-up at {MIN_REGION_AREA} px: {(ious < 1).sum()} of {len(ious)} change, mean IoU "
          f"{ious.mean():.4f}, masks >= 400 px under 0.95: {(ious[areas >= 400] < 0.95).sum()}")
    assert len(ious) == 929 and (ious < 1).sum() == 60
    assert ious.mean() >= 0.993 and (ious[areas >= 400] < 0.95).sum() == 4
