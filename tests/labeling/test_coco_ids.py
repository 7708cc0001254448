"""COCO files as they come: ids of every form either import and score 1.0 against themselves, or
are refused naming the entry; absurd polygon coordinates import and evaluate in bounded memory."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from distillery.engine.cli import main
from distillery.engine.evaluation import EvalError, evaluate, load_gt, records_to_predictions
from distillery.engine.store import LabelStore
from distillery.labeling.coco import CocoError, import_coco

SIZES = {"a.png": (64, 48), "b.png": (40, 40)}  # file -> (width, height)


def base_gt() -> dict:
    """Two images, two classes, three instances: polygons, a box-only one, and two polygons in one."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 40}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 16], "iscrowd": 0,
             "segmentation": [[4, 4, 24, 4, 24, 20, 4, 20]]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 10, 25, 30]},  # no iscrowd, no segmentation
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [2, 2, 30, 30], "iscrowd": 0,
             "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12], [20, 20, 32, 20, 32, 32, 20, 32]]},
        ],
    }


def renumber(gt: dict, images: list, cats: list, anns: list | None) -> dict:
    g = copy.deepcopy(gt)
    im_map = {im["id"]: new for im, new in zip(g["images"], images)}
    cat_map = {c["id"]: new for c, new in zip(g["categories"], cats)}
    for im in g["images"]:
        im["id"] = im_map[im["id"]]
    for c in g["categories"]:
        c["id"] = cat_map[c["id"]]
    for k, a in enumerate(g["annotations"]):
        a["image_id"], a["category_id"] = im_map[a["image_id"]], cat_map[a["category_id"]]
        if anns is None:
            del a["id"]
        else:
            a["id"] = anns[k]
    return g


ID_FORMS = {  # images, categories, annotations (None: no annotation ids at all)
    "one-based": ([1, 2], [1, 2], [1, 2, 3]),
    "zero-based": ([0, 1], [0, 1], [0, 1, 2]),
    "duplicated annotation ids": ([1, 2], [1, 2], [7, 7, 7]),
    "strings": (["img-a", "img-b"], ["c1", "c2"], ["x", "y", "z"]),
    "mixed strings and ints": ([0, "img-b"], ["dog-id", 3], [0, "1", 2]),
    "huge ints": ([2**64 + 1, 2**64], [2**70, 1], [2**80, 2**80 + 1, 0]),
    "negative": ([-1, -2], [-5, 0], [-1, -2, -3]),
    "missing annotation ids": ([1, 2], [1, 2], None),
}


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / name)
    return d


def self_score(gt: dict, images_dir, tmp_path) -> dict:
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    ls, stats = import_coco(LabelStore(tmp_path / "store"), str(tmp_path / "gt.json"), str(images_dir))
    assert stats["errors"] == 0 and stats["instances"] == len(gt["annotations"])
    recs = [r for r in ls.iter_records() if r.error is None]
    return evaluate(load_gt(tmp_path / "gt.json"), records_to_predictions(recs, ls.classes), ls.classes,
                    image_files=[r.path for r in recs])


@pytest.mark.parametrize("form", list(ID_FORMS))
def test_any_id_form_scores_one_against_itself(form, images_dir, tmp_path):
    gt = renumber(base_gt(), *ID_FORMS[form])
    rep = self_score(gt, images_dir, tmp_path)
    # before the fix (with iscrowd, area and segmentation on every annotation): zero-based 0.626, huge ints 0.626
    # (one id is 0), duplicated 0.168; strings ValueError, mixed TypeError, missing ids KeyError; without them KeyError
    assert rep["bbox"]["mAP50-95"] == pytest.approx(1.0) and rep["segm"]["mAP50-95"] == pytest.approx(1.0)
    assert rep["images"] == 2 and sorted(rep["categories_evaluated"]) == ["cat", "dog"]
    assert {n: v["gt_instances"] for n, v in rep["segm"]["per_class"].items()} == {"cat": 2, "dog": 1}


def test_eval_cli_scores_zero_based_gt_one(images_dir, tmp_path):
    gt = renumber(base_gt(), *ID_FORMS["zero-based"])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    r = CliRunner()
    out = r.invoke(main, ["labels", "import", "--coco", str(tmp_path / "gt.json"), "--images", str(images_dir),
                          "--store", str(tmp_path / "s")])
    assert out.exit_code == 0, out.output
    out = r.invoke(main, ["eval", "--store", str(tmp_path / "s"), "--gt", str(tmp_path / "gt.json"),
                          "--out", str(tmp_path / "rep")])
    assert out.exit_code == 0, out.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["bbox"]["mAP50-95"] == pytest.approx(1.0) and rep["segm"]["mAP50-95"] == pytest.approx(1.0)


REFUSED = [
    (lambda g: g["images"][1].update(id=1.5), r"image #1 \(id 1\.5, 'b\.png'\): id must be an integer or a non-empty string"),
    (lambda g: g["images"][1].update(id=True), r"image #1 \(id True, 'b\.png'\): id must be"),
    (lambda g: g["images"][1].update(id=None), r"image #1 \(id None, 'b\.png'\): id must be"),
    (lambda g: g["images"][1].update(id=[2]), r"image #1 \(id \[2\], 'b\.png'\): id must be"),
    (lambda g: g["images"][1].update(id=1), r"image id 1 is given to several images \(image #1"),
    (lambda g: g["images"][1].update(file_name=7), r"image #1 \(id 2, 7\): file_name must be a non-empty string"),
    (lambda g: g["categories"][1].update(id=1), r"category id 1 is given to several categories \(#1, 'dog'\)"),
    (lambda g: g["categories"][1].update(id=""), r"category #1 \('dog'\): id '' must be"),
    (lambda g: g["categories"][1].update(name="cat"), r"category name 'cat' is given to several categories \(#1, id 2\)"),
    (lambda g: g["annotations"][2].update(image_id="2"),
     r"annotation #2 \(id 3\) refers to image_id '2', which 'images' does not define \(it defines 2: an integer"),
    (lambda g: g["annotations"][1].update(category_id=9), r"annotation #1 \(id 2\) refers to category_id 9"),
    (lambda g: g["annotations"][0].update(bbox=[4, 4, float("nan"), 16]), r"annotation #0 \(id 1\): bbox must be"),
    (lambda g: g["annotations"][0].update(segmentation=[[4, 4, float("nan"), 4, 24, 20]]),
     r"annotation #0 \(id 1\): polygon 0 must be an even-length list"),
    (lambda g: g["annotations"][0].update(segmentation=[[4, 4, 24, 4, 24]]), r"annotation #0 \(id 1\): polygon 0"),
    (lambda g: g["annotations"][0].update(segmentation={"size": [10, 10], "counts": "abc"}),
     r"annotation #0 \(id 1\): segmentation size \[10, 10\] != image \[height, width\] \[48, 64\]"),
    (lambda g: g["annotations"][0].update(bbox=[100, 100, 5, 5]), r"annotation #0 \(id 1\).*no area inside the 64x48"),
    (lambda g: g["annotations"][0].update(segmentation={"size": [48, 64], "counts": "`0"}),  # runs sum to 16
     r"annotation #0 \(id 1\).*RLE counts cannot be decoded"),
]


@pytest.mark.parametrize("edit, message", REFUSED)
def test_bad_ids_and_coordinates_are_refused_naming_the_entry(edit, message, images_dir, tmp_path):
    gt = base_gt()
    edit(gt)
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt))
    with pytest.raises(CocoError, match=message):
        import_coco(LabelStore(tmp_path / "s"), str(p), str(images_dir))
    out = CliRunner().invoke(main, ["labels", "import", "--coco", str(p), "--images", str(images_dir),
                                    "--store", str(tmp_path / "s")])
    assert out.exit_code == 1 and "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1
    if "no area" in message:  # eval scores it (a miss for every model) and lists it
        return
    if "cannot be decoded" in message:  # content: eval refuses it when rasterising
        with pytest.raises(EvalError, match="GT: " + message):
            evaluate(load_gt(p), [], ["cat", "dog"], image_files=["a.png"])
    else:  # structure: eval refuses the GT file as it reads it, naming the file
        with pytest.raises(EvalError, match=f"GT file {p}: " + message):
            load_gt(p)


def test_unmatchable_gt_instances_are_listed_by_eval(images_dir, tmp_path):
    gt = base_gt()
    gt["annotations"].append({"id": 9, "image_id": 2, "category_id": 2, "bbox": [50, 50, 5, 5]})  # outside 40x40
    rep = evaluate(gt, [], ["cat", "dog"], image_files=["a.png", "b.png"])
    assert rep["gt_unmatchable"] == ["annotation #3 (id 9): bbox [50, 50, 5, 5] has no area inside the 40x40 image"]


def test_eval_refuses_gt_images_that_share_a_file_name(images_dir, tmp_path):
    gt = base_gt()
    gt["images"][1]["file_name"] = "other/a.png"
    with pytest.raises(EvalError, match=r"GT images 'a\.png' and 'other/a\.png' share the file name 'a\.png'"):
        evaluate(gt, [], ["cat", "dog"], image_files=["a.png"])


def run_isolated(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python; its ``cap()`` limits the address space to what is mapped
    now plus 2 GiB (call it after the imports): a segfault or an out-of-memory there fails the
    test instead of killing pytest."""
    prelude = textwrap.dedent("""
        import resource
        def cap():
            vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize:")).split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_absurd_polygon_imports_and_evaluates_in_bounded_memory(tmp_path):
    """A vertex at x = 2e8 on a 28x28 image: pycocotools alone segfaults or runs out of memory.
    Clipped first, the mask is the in-frame part of the shape: the rectangle x >= 2, 2 <= y <= 20."""
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "t.png")
    gt = {"images": [{"id": 0, "file_name": "t.png", "width": 28, "height": 28}],
          "categories": [{"id": 0, "name": "thing"}],
          "annotations": [{"id": 0, "image_id": 0, "category_id": 0, "bbox": [2, 2, 2e8, 18],
                           "segmentation": [[2, 2, 2e8, 2, 2e8, 20, 2, 20]]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    r = run_isolated(f"""
        import json
        from pycocotools import mask as mask_utils
        from distillery.engine.evaluation import evaluate, load_gt, records_to_predictions
        from distillery.engine.store import LabelStore
        from distillery.labeling.coco import import_coco
        import distillery.labeling.teachers  # noqa: F401 - import_coco's lazy import, before the cap
        cap()
        d = {str(tmp_path)!r}
        ls, stats = import_coco(LabelStore(d + "/s"), d + "/gt.json", d)
        rec = next(ls.iter_records())
        rep = evaluate(load_gt(d + "/gt.json"), records_to_predictions([rec], ls.classes), ls.classes, ["t.png"])
        m = mask_utils.decode(rec.masks[0])
        print(json.dumps({{"errors": stats["errors"], "mask": m.tolist(), "box": rec.boxes[0].tolist(),
                          "bbox": rep["bbox"]["mAP50-95"], "segm": rep["segm"]["mAP50-95"]}}))
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    truth = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[2, 2, 56, 2, 56, 20, 2, 20]], 28, 28)))
    expected = np.zeros((28, 28), np.uint8)
    expected[2:20, 2:28] = 1  # pixel centres inside [2, inf) x [2, 20]
    assert np.array_equal(truth, expected)  # pycocotools' own answer for a vertex it can handle
    assert out["errors"] == 0 and np.array_equal(np.array(out["mask"], np.uint8), expected)
    assert out["box"] == [2.0, 2.0, 28.0, 20.0]
    assert out["bbox"] == pytest.approx(1.0) and out["segm"] == pytest.approx(1.0)


def test_clipping_keeps_in_frame_pixels_of_any_shape():
    """Clipped and unclipped rasterisations agree where pycocotools can do both (vertex at 2e4)."""
    from distillery.engine.cocofile import clip_polygon, segmentation_to_rle

    for poly in ([2, 2, 2e4, 3, 10, 20], [-3e4, 5, 20, -1e4, 25, 27, 1, 26], [5, 5, 3e4, 5, 20, 20, 5, 5e4]):
        ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], 28, 28)))
        got = mask_utils.decode(segmentation_to_rle([poly], 28, 28))
        assert ref.sum() > 50 and np.array_equal(got, ref), poly
        assert all(abs(v) <= 56 for q in clip_polygon(poly, 28, 28) for v in q)
    inside = [1, 1, 40, 1, 40, 40]  # within the window: handed on untouched
    assert clip_polygon(inside, 28, 28) == [inside]
    assert mask_utils.area(segmentation_to_rle([[100, 100, 200, 100, 200, 200]], 28, 28)) == 0


def test_compressed_runs_match_pycocotools_encoding():
    """Run lengths read back from pycocotools' own compressed strings: zeros first, alternating,
    summing to height * width, ones summing to the mask's area."""
    from distillery.engine.cocofile import compressed_runs

    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        m[:] = 0 if t % 5 == 0 else (1 if t % 7 == 0 else m)
        runs = compressed_runs(mask_utils.encode(np.asfortranarray(m))["counts"])
        assert sum(runs) == h * w and sum(runs[1::2]) == m.sum() and min(runs) >= 0
        flat = np.repeat(np.arange(len(runs)) % 2, runs)  # column-major, as COCO RLE
        assert np.array_equal(flat.reshape(w, h).T, m)
