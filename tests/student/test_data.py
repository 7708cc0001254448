"""Training data from the store: selection by curation and thresholds, masks with holes and
parts reaching the training target, labels that no path rule can lose."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from distillery.engine.images import content_id
from distillery.engine.record import LabelRecord
from distillery.engine.store import CURATION_SCHEMA, LabelStore
from distillery.student.data import Selection, StoreSegDataset, build_table

H, W = 240, 320
CLASSES = ["cat", "dog"]


def _img(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    return content_id(path.read_bytes())


def _rle(m):
    return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))


def ring_and_two_parts():
    yy, xx = np.mgrid[:H, :W]
    d2 = (xx - 100) ** 2 + (yy - 120) ** 2
    ring = (d2 <= 80**2) & (d2 >= 40**2)
    two = np.zeros((H, W), bool)
    two[30:110, 200:260] = True
    two[150:220, 230:300] = True
    return ring, two


def _box(m):
    ys, xs = np.nonzero(m)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.fixture
def store(tmp_path):
    st = LabelStore(tmp_path / "store")
    ls = st.create({"ontology": {"classes": CLASSES}, "test": "student"})
    ring, two = ring_and_two_parts()
    p = tmp_path / "images"
    p.mkdir()
    ids = [_img(p / f"{i}.png", i) for i in range(2)]
    masks = [ring, two]
    rec0 = LabelRecord(image_id=ids[0], path=str(p / "0.png"), width=W, height=H, num_classes=2,
                       boxes=np.array([_box(m) for m in masks], np.float32),
                       scores=np.array([[0.9, 0.1], [0.2, 0.6]], np.float32), box_score=[0.9, 0.6],
                       masks=[_rle(m) for m in masks], mask_score=[0.9, 0.9])
    # image 1: five small instances that exercise every selection rule
    boxes, scores, ms = [], [], []
    for k, (s_cat, s_dog) in enumerate([(0.8, 0.1), (0.2, 0.1), (0.05, 0.0), (0.1, 0.5), (0.7, 0.2)]):
        m = np.zeros((H, W), bool)
        m[10 + 40 * k:40 + 40 * k, 10:60] = True
        boxes.append(_box(m)), scores.append([s_cat, s_dog]), ms.append(_rle(m))
    sc = np.array(scores, np.float32)
    rec1 = LabelRecord(image_id=ids[1], path=str(p / "1.png"), width=W, height=H, num_classes=2,
                       boxes=np.array(boxes, np.float32), scores=sc, box_score=sc.max(1), masks=ms,
                       mask_score=np.full(5, 0.9, np.float32))
    with ls.writer() as w:
        w.add(rec0.to_row()), w.add(rec1.to_row())
        w.add(LabelRecord.failed(str(p / "gone.png"), "missing: file not found", 2).to_row())
    return st, ls, rec0, rec1


def test_selection_follows_thresholds_curation_and_weights(store):
    _, ls, rec0, rec1 = store
    t = build_table(ls, Selection(min_score=0.5, ignore_min_score=0.15, val_fraction=0.0))
    s = t.stats
    # rec0: both kept; rec1: 0.8 kept, 0.2 ignore, 0.05 background, dog 0.5 kept, 0.7 kept
    assert (s["kept"], s["ignored"], s["background"], s["error_images"]) == (5, 1, 1, 1)
    assert t.ignore.sum() == 1 and (t.hard == -1).sum() == 1
    np.testing.assert_allclose(t.weight[~t.ignore], [0.9, 0.6, 0.8, 0.5, 0.7], rtol=1e-6)
    np.testing.assert_array_equal(t.soft[1], np.float32([0.2, 0.6]))  # the teacher's vector, not one-hot
    assert t.hard.tolist() == [0, 1, 0, -1, 1, 0]

    # curation: reject one, ignore one, relabel one (one-hot, weight 1), reject image 0 entirely
    ids1 = rec1.instance_ids
    dec = [
        {"image_id": rec1.image_id, "instance_id": ids1[0], "decision": "reject", "label": None, "source": "manual"},
        {"image_id": rec1.image_id, "instance_id": ids1[4], "decision": "ignore", "label": None, "source": "rules"},
        {"image_id": rec1.image_id, "instance_id": ids1[3], "decision": "accept", "label": "cat", "source": "manual"},
        {"image_id": rec0.image_id, "instance_id": None, "decision": "reject", "label": None, "source": "manual"},
    ]
    assert ls.commit_curation(pa.Table.from_pylist(dec, schema=CURATION_SCHEMA)) == 1
    t = build_table(ls, Selection(min_score=0.5, ignore_min_score=0.15, val_fraction=0.0))
    s = t.stats
    assert (s["rejected"], s["relabeled"], s["images_rejected"], s["kept"], s["ignored"]) == (1, 1, 1, 0, 2)
    r = t.hard.tolist().index(0)
    np.testing.assert_array_equal(t.soft[r], [1.0, 0.0])
    assert t.weight[r] == 1.0
    assert build_table(ls, Selection(curation=0, val_fraction=0.0)).stats["images_rejected"] == 0  # no curation

    # a class subset: dogs become background, soft vectors keep the cat column only
    t = build_table(ls, Selection(classes=("cat",), min_score=0.5, curation=0, val_fraction=0.0))
    assert t.names == ["cat"] and t.soft.shape[1] == 1 and t.stats["background"] == 3
    with pytest.raises(ValueError, match="horse"):
        build_table(ls, Selection(classes=("horse",)))
    with pytest.raises(ValueError, match="ignore_min_score"):
        build_table(ls, Selection(min_score=0.2, ignore_min_score=0.3))


def test_split_is_deterministic_by_image_id(store):
    import hashlib

    _, ls, rec0, rec1 = store
    h = [int(hashlib.sha256(r.image_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for r in (rec0, rec1)]
    frac = sum(h) / 2  # one image on each side
    a = build_table(ls, Selection(val_fraction=frac, curation=0))
    b = build_table(ls, Selection(val_fraction=frac, curation=0))
    assert a.images == b.images and len(a.images["val"]) == len(a.images["train"]) == 1
    assert a.images["val"][0][0] == (rec0, rec1)[int(np.argmin(h))].path


def _dataset(table, split="train", imgsz=W, mask_ratio=1, overlap=False, augment=False):
    from ultralytics.cfg import get_cfg

    hyp = get_cfg(overrides={"mask_ratio": mask_ratio, "overlap_mask": overlap})
    return StoreSegDataset(img_path="", imgsz=imgsz, augment=augment, hyp=hyp, rect=False, batch_size=2,
                           data={"names": dict(enumerate(table.names)), "nc": len(table.names), "channels": 3},
                           task="segment", table=table, split=split, pad=0.0)


def _letterboxed(mask, imgsz):
    """The store mask as ultralytics' LetterBox(scaleup=False) places it in an imgsz square."""
    r = min(imgsz / H, imgsz / W, 1.0)
    nh, nw = round(H * r), round(W * r)
    m = mask.astype(np.uint8) if r == 1 else np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh))) > 127
    top, left = round((imgsz - nh) / 2 - 0.1), round((imgsz - nw) / 2 - 0.1)
    out = np.zeros((imgsz, imgsz), bool)
    out[top:top + nh, left:left + nw] = m
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_ring_and_two_part_masks_reach_the_training_target(store, overlap):
    _, ls, rec0, _ = store
    ring, two = ring_and_two_parts()
    t = build_table(ls, Selection(val_fraction=0.0, curation=0))
    ds = _dataset(t, overlap=overlap)
    i = [p for p, _, _ in t.images["train"]].index(rec0.path)
    item = ds[i]
    masks = item["masks"].numpy()
    rows = item["cls"].view(-1).long().tolist()
    assert sorted(t.hard[rows].tolist()) == [0, 1]
    for k, row in enumerate(rows):
        target = (masks[0] == k + 1) if overlap else masks[k].astype(bool)
        want = _letterboxed(ring if t.hard[row] == 0 else two, W)
        iou = (target & want).sum() / (target | want).sum()
        print(f"\n{'ring' if t.hard[row] == 0 else 'two-part'} mask, overlap={overlap}: training-target IoU {iou:.4f}")
        assert iou >= 0.95, (k, iou)
    # the hole is open and both parts present
    ring_target = (masks[0] == rows.index(0) + 1) if overlap else masks[rows.index(0)].astype(bool)
    off = (W - W) // 2, (W - H) // 2
    assert not ring_target[120 + off[1], 100 + off[0]]  # centre of the hole
    two_target = (masks[0] == rows.index(1) + 1) if overlap else masks[rows.index(1)].astype(bool)
    top = (H - H) // 2 + (W - H) // 2
    for ys, xs in ((slice(30, 110), slice(200, 260)), (slice(150, 220), slice(230, 300))):  # each part covered
        part = two_target[ys.start + top:ys.stop + top, xs]
        assert part.mean() >= 0.95
    extra = two_target & ~_letterboxed(two, W)  # the zero-width bridge merge_multi_segment draws
    assert extra.sum() <= 0.02 * two.sum()


def test_ignore_regions_carry_no_mask_and_keep_their_box(store):
    _, ls, _, rec1 = store
    t = build_table(ls, Selection(min_score=0.5, ignore_min_score=0.15, val_fraction=0.0, curation=0))
    ds = _dataset(t, overlap=True)
    i = [p for p, _, _ in t.images["train"]].index(rec1.path)
    item = ds[i]
    rows = item["cls"].view(-1).long().numpy()
    ign = t.ignore[rows]
    assert ign.sum() == 1 and ign[-1]  # appended after the real instances
    assert int(item["masks"].max()) == (~ign).sum()  # no mask index for the ignore region
    np.testing.assert_allclose(item["bboxes"][-1].numpy() * [W, W, W, W],  # xywh normalised to the padded square
                               [35, 65 + (W - H) / 2, 50, 30], atol=1.0)  # instance 1: rows 50..80, cols 10..60


def test_symlinked_image_folder_keeps_every_label(store, tmp_path):
    """ultralytics finds label files by rewriting /images/ in the resolved path; the store
    dataset has no label files, so a symlinked folder cannot lose labels."""
    st, ls, rec0, rec1 = store
    link = tmp_path / "linked" / "images"
    link.parent.mkdir()
    os.symlink(tmp_path / "images", link)
    ls2 = st.create({"ontology": {"classes": CLASSES}, "test": "symlink"})
    with ls2.writer() as w:
        for r in (rec0, rec1):
            r2 = LabelRecord(**{**r.__dict__, "path": str(link / os.path.basename(r.path))})
            w.add(r2.to_row())
    t = build_table(ls2, Selection(min_score=0.0, ignore_min_score=0.0, val_fraction=0.0, curation=0))
    ds = _dataset(t)
    assert sum(len(lb["cls"]) for lb in ds.labels) == 7
    assert sum(len(ds[i]["cls"]) for i in range(len(ds))) == 7


def test_each_instance_is_converted_once_per_run_not_per_epoch(store, monkeypatch):
    """Masks become polygons when the dataset is built: two passes over the data (two epochs,
    with augmentation) call the conversion once per real instance, and the training targets are
    the polygons of those masks (box outlines for ignore regions)."""
    import distillery.student.data as data
    from distillery.engine.polygons import mask_to_polygon

    calls = []

    def counting(mask, *a, **k):
        calls.append(int(mask.sum()))
        return mask_to_polygon(mask, *a, **k)

    monkeypatch.setattr(data, "mask_to_polygon", counting)
    _, ls, _, _ = store
    t = build_table(ls, Selection(min_score=0.5, ignore_min_score=0.15, val_fraction=0.0, curation=0))
    real = [r for _, _, rows in t.images["train"] for r in rows if not t.ignore[r]]
    assert len(real) == 5 and t.ignore.sum() == 1  # ring, two-part, three of the five small ones; one ignore region
    ds = _dataset(t, augment=True)  # ultralytics' training augmentations (mosaic, random affine, flips...)
    assert sorted(calls) == sorted(int(mask_utils.area(t.masks[r])) for r in real)  # each real row, once
    for lb, (_, (h, w), rows) in zip(ds.labels, t.images["train"]):
        for seg, r in zip(lb["segments"], rows):
            want = (np.array([[t.boxes[r][i], t.boxes[r][j]] for i, j in ((0, 1), (2, 1), (2, 3), (0, 3))])
                    if t.ignore[r] else mask_to_polygon(mask_utils.decode(t.masks[r])))
            np.testing.assert_allclose(seg * [w, h], want, atol=1e-3)
    for _epoch in range(2):
        for i in range(len(ds)):
            rows = ds[i]["cls"].view(-1).long().tolist()  # a mosaic: instances of several images
            assert set(rows) <= set(range(len(t.hard)))
    assert len(calls) == len(real)



def test_training_polygons_are_traced_in_the_fill_frame(store):
    """The dataset's polygons are those traced at ``polygon_scale``: at imgsz 64 with augmentation
    the fill frame's longest side is 64 * (1 + scale) = 96 px, so a 320 px wide image's masks are
    traced at 96 / 320 (fewer vertices than at full size); without augmentation at 64 / 320; at an
    imgsz whose fill frame covers the image, at full size."""
    from ultralytics.cfg import get_cfg

    from distillery.engine.polygons import mask_to_polygon

    _, ls, _, _ = store
    t = build_table(ls, Selection(min_score=0.5, ignore_min_score=0.15, val_fraction=0.0, curation=0))
    for imgsz, augment, want_side in ((64, True, 64 * (1 + get_cfg().scale)), (64, False, 64), (W, True, None)):
        ds = _dataset(t, imgsz=imgsz, augment=augment)
        if want_side is not None:
            assert ds.fill_side == pytest.approx(want_side)
        unlike_full_size = 0
        for lb, (_, (h, w), rows) in zip(ds.labels, t.images["train"]):
            scale = min(1.0, want_side / max(h, w)) if want_side else 1.0
            assert ds.polygon_scale(h, w) == pytest.approx(scale)
            for seg, r in zip(lb["segments"], rows):
                if t.ignore[r]:
                    continue
                mask = mask_utils.decode(t.masks[r])
                np.testing.assert_allclose(seg * [w, h], mask_to_polygon(mask, scale=scale), atol=1e-3)
                full = mask_to_polygon(mask)
                unlike_full_size += seg.shape != full.shape or not np.allclose(seg * [w, h], full, atol=1e-3)
        assert (unlike_full_size > 0) == (want_side is not None)  # the scale is really applied, and only then


def _fill_frame_targets(masks, imgsz, augment):
    """For each (H, W) mask: the training target ultralytics rasterises (``polygon2mask``, mask
    ratio 4, at zoom 1 and at the largest zoom ``1 + scale``) from its polygon traced at full size
    and from the one the dataset traces (``StoreSegDataset.polygon_scale``), each scored by IoU
    against the mask itself resampled to the target's frame by area (``cv2.INTER_AREA``, >= 0.5).
    Returns (IoUs full, IoUs dataset, vertices full, vertices dataset)."""
    from types import SimpleNamespace

    import cv2
    from ultralytics.cfg import get_cfg
    from ultralytics.data.utils import polygon2mask

    from distillery.engine.polygons import mask_to_polygon

    hyp = get_cfg()
    # as StoreSegDataset sets it (test_training_polygons_are_traced_in_the_fill_frame)
    fill = SimpleNamespace(fill_side=imgsz * (1 + hyp.scale) if augment else imgsz)
    ious, verts = ([], []), [0, 0]
    for m in masks:
        h, w = m.shape
        polys = (mask_to_polygon(m), mask_to_polygon(m, scale=StoreSegDataset.polygon_scale(fill, h, w)))
        for zoom in (1.0, 1 + hyp.scale) if augment else (1.0,):
            f = imgsz * zoom / max(h, w)
            shape = (round(h * f), round(w * f))
            ref = cv2.resize(m.astype(np.float32), (shape[1] // 4, shape[0] // 4), interpolation=cv2.INTER_AREA) >= 0.5
            if ref.sum() < 16:  # a few target pixels: any IoU is noise
                continue
            for j, p in enumerate(polys):
                t = polygon2mask(shape, [(p * f).reshape(-1)], downsample_ratio=4).astype(bool)
                ious[j].append((t & ref).sum() / (t | ref).sum())
        verts[0], verts[1] = verts[0] + len(polys[0]), verts[1] + len(polys[1])
    return np.array(ious[0]), np.array(ious[1]), verts[0], verts[1]


def test_masks_traced_in_the_fill_frame_give_training_targets_as_close_as_full_size(coco128_gt):
    """The dataset traces each mask in the finest frame ultralytics fills polygons in (longest
    side ``imgsz * (1 + scale)``): on coco128's GT masks and on SAM-like ragged masks (after SAM's
    clean-up), the targets the loss sees match the mask as closely as targets from full-size
    polygons, with fewer vertices at a small ``imgsz``. Measured: see the printed line."""
    from distillery.labeling.segmenter import remove_small_regions
    from tests.engine.test_polygons import sam_like_ragged_mask

    images = {im["id"]: im for im in coco128_gt["images"]}
    gt = []
    for a in coco128_gt["annotations"][:300]:
        if not a["iscrowd"]:
            im = images[a["image_id"]]
            gt.append(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"]))))
    ragged = [remove_small_regions(sam_like_ragged_mask(seed=s), 100).astype(np.uint8) for s in range(4)]
    for imgsz in (160, 640):
        for name, masks, slack in (("GT", gt, 0.005), ("ragged", ragged, 0.01)):
            full, ours, v_full, v_ours = _fill_frame_targets(masks, imgsz, augment=True)
            print(f"\nimgsz {imgsz} {name}: {len(full)} targets, IoU to the area-resampled mask: full size "
                  f"{full.mean():.4f} (p5 {np.percentile(full, 5):.4f}), fill frame {ours.mean():.4f} "
                  f"(p5 {np.percentile(ours, 5):.4f}); vertices {v_full} -> {v_ours}")
            assert ours.mean() >= full.mean() - slack
            assert np.percentile(ours, 5) >= np.percentile(full, 5) - 2 * slack
            assert v_ours * (2 if imgsz == 160 else 1) <= v_full  # 640 px photos at 640: nothing to drop
