from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from pycocotools.coco import COCO

from distillery.engine.cli import main


def test_cli_label_info_export(tiny_teachers, coco128, tmp_path):
    from distillery.engine.job import AUTO_LOCAL_BELOW

    r = CliRunner()
    lst = tmp_path / "few.txt"
    lst.write_text("\n".join(str(coco128 / "images" / n) for n in ["000000000009.jpg", "000000000025.jpg"]) + "\nmissing.jpg\n")
    store = tmp_path / "store"
    out = r.invoke(main, ["label", str(lst), "--classes", "person,giraffe", "--store", str(store),
                          "--teachers", str(tiny_teachers)])
    assert out.exit_code == 0, out.output
    assert "3 images processed this run" in out.stdout and "missing 1" in out.stdout
    # --runner auto: too few images to start Ray, said on stderr (unless an earlier test of this
    # process left Ray running: then its start-up is paid); the summary says where the time went
    import ray

    runner = "ray" if ray.is_initialized() else "local"
    if runner == "local":
        assert (f"runner local: 3 images < {AUTO_LOCAL_BELOW}, too few to repay Ray's start-up "
                "(--runner ray to force it)") in out.stderr
    else:
        assert "runner ray: Ray is already running in this process" in out.stderr
    assert "first labelled images after" in out.stderr
    assert f"time: runner {runner}, " in out.stdout and "busy: decode " in out.stdout
    info = r.invoke(main, ["labels", "info", "--store", str(store), "--json"])
    (row,) = json.loads(info.output)
    assert row["images"] == 3 and row["labeled"] == 2 and row["errors"] == {"missing": 1}
    out = r.invoke(main, ["labels", "export", "--store", str(store), "--format", "coco", "--out", str(tmp_path / "l.json")])
    assert out.exit_code == 0, out.output
    coco = COCO(str(tmp_path / "l.json"))
    assert len(coco.imgs) == 2 and len(coco.getAnnIds()) == row["instances"]
    out = r.invoke(main, ["labels", "export", "--store", str(store), "--format", "yolo-seg", "--out", str(tmp_path / "y")])
    assert out.exit_code == 0 and (tmp_path / "y" / "data.yaml").is_file()
    val = len(list((tmp_path / "y" / "images" / "val").glob("*")))  # 2 images at --val-fraction 0.1
    assert ("warning: no validation image" in out.stderr) == (val == 0), (val, out.stderr)
    out = r.invoke(main, ["labels", "export", "--store", str(store), "--format", "yolo-seg", "--out", str(tmp_path / "y1"),
                          "--val-fraction", "1"])
    assert out.exit_code == 0 and "warning" not in out.stderr and "0 train / 2 val images" in out.stdout, out.output


def test_cli_user_errors_are_clear(tmp_path, tiny_teachers):
    r = CliRunner()
    out = r.invoke(main, ["label", str(tmp_path / "nope"), "--classes", "a", "--store", str(tmp_path / "s"),
                          "--teachers", str(tiny_teachers)])
    assert out.exit_code == 1 and "does not exist" in out.output and "Traceback" not in out.output
    out = r.invoke(main, ["label", str(tmp_path), "--store", str(tmp_path / "s")])
    assert out.exit_code == 1 and "exactly one of --classes or --ontology" in out.output
    out = r.invoke(main, ["label", str(tmp_path), "--classes", "a", "--store", str(tmp_path / "s"),
                          "--teachers", str(tmp_path / "none.yaml")])
    assert out.exit_code == 1 and "none.yaml" in out.output and "neither a file nor a shipped teachers preset" in out.output
    out = r.invoke(main, ["labels", "export", "--store", str(tmp_path / "empty"), "--format", "coco", "--out", "x.json"])
    assert out.exit_code == 1 and f"--store {tmp_path / 'empty'} does not exist" in out.output
    (tmp_path / "empty" / "labelsets").mkdir(parents=True)
    out = r.invoke(main, ["labels", "export", "--store", str(tmp_path / "empty"), "--format", "coco", "--out", "x.json"])
    assert out.exit_code == 1 and "no label sets" in out.output
    from distillery.engine.job import AUTO_LOCAL_BELOW

    help_ = r.invoke(main, ["label", "--help"]).output
    assert "Example" in help_ and f"local for fewer than {AUTO_LOCAL_BELOW} images" in " ".join(help_.split())


def test_cli_names_import_label_and_export_by_name(tiny_teachers, coco128, coco128_gt, tmp_path):
    r = CliRunner()
    imgs = coco128_gt["images"][:3]
    keep = {im["id"] for im in imgs}
    sub = {**coco128_gt, "images": imgs, "annotations": [a for a in coco128_gt["annotations"] if a["image_id"] in keep]}
    gt_path = tmp_path / "gt3.json"
    gt_path.write_text(json.dumps(sub))
    store = str(tmp_path / "store")
    imp = ["labels", "import", "--coco", str(gt_path), "--images", str(coco128 / "images"), "--store", store]
    out = r.invoke(main, [*imp, "--name", "coco128-gt"])
    assert out.exit_code == 0 and "(coco128-gt) now holds 3 images" in out.output, out.output
    assert r.invoke(main, [*imp, "--name", "coco128-gt"]).exit_code == 0  # rerun: resume
    out = r.invoke(main, [*imp, "--name", "other"])
    assert out.exit_code == 1 and "already named 'coco128-gt', not 'other'" in out.output
    out = r.invoke(main, [*imp, "--name", "ls-00ff"])
    assert out.exit_code == 2 and "reads as an id prefix" in out.output
    lst = tmp_path / "few.txt"
    lst.write_text("\n".join(str(coco128 / "images" / im["file_name"]) for im in imgs[:1]) + "\n")
    lab = ["label", str(lst), "--classes", "person", "--store", store, "--teachers", str(tiny_teachers),
           "--runner", "local", "--quiet"]
    out = r.invoke(main, [*lab, "--name", "coco128-gt"])
    assert out.exit_code == 1 and "'coco128-gt' is already used by ls-" in out.output, out.output
    out = r.invoke(main, [*lab, "--name", "tiny"])
    assert out.exit_code == 0, out.output
    info = r.invoke(main, ["labels", "info", "--store", store, "--json"])
    rows = {row["name"]: row for row in json.loads(info.output)}
    assert (rows["coco128-gt"]["kind"], rows["coco128-gt"]["images"], rows["tiny"]["images"]) == ("import", 3, 1)
    text = r.invoke(main, ["labels", "info", "--store", store]).output.splitlines()
    assert text[0].split()[:3] == ["name", "id", "kind"]
    assert text[1].split()[:3] == ["coco128-gt", rows["coco128-gt"]["labelset"], "import"]
    export = ["labels", "export", "--store", store, "--format", "coco", "--out", str(tmp_path / "l.json")]
    out = r.invoke(main, export)  # two label sets, none chosen
    assert out.exit_code == 1 and "--labelset NAME|ID" in out.output
    assert f"coco128-gt ({rows['coco128-gt']['labelset']}, import, 3 images)" in out.output
    out = r.invoke(main, [*export, "--labelset", "coco128-gt"])
    assert out.exit_code == 0, out.output

    def keyed(coco):  # (file, class name, rounded xywh) of every annotation
        names = {c["id"]: c["name"] for c in coco["categories"]}
        files = {im["id"]: Path(im["file_name"]).name for im in coco["images"]}
        return sorted((files[a["image_id"]], names[a["category_id"]], *(round(v, 2) for v in a["bbox"]))
                      for a in coco["annotations"])

    exported = json.loads((tmp_path / "l.json").read_text())
    assert len(sub["annotations"]) > 0 and keyed(exported) == keyed(sub)


def test_tiny_and_thin_images_are_labeled_not_fatal(tiny_teachers, tmp_path):
    """1x1, 4x4, 100x1 and 1x100 images: the detector's processor used to guess the channel axis
    from the shape and crash the whole batch (on every resume). Each is labeled, with boxes
    inside its own frame."""
    import numpy as np
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    sizes = [(1, 1), (4, 4), (100, 1), (1, 100), (3, 3)]
    for w, h in sizes:
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(src / f"{w}x{h}.png")
    r = CliRunner()
    out = r.invoke(main, ["label", str(src), "--classes", "person", "--store", str(tmp_path / "s"), "--teachers",
                          str(tiny_teachers), "--runner", "local", "--quiet"])
    assert out.exit_code == 0 and "5 with labels" in out.output and "errors: none" in out.output, out.output
    out = r.invoke(main, ["labels", "export", "--store", str(tmp_path / "s"), "--format", "coco",
                          "--out", str(tmp_path / "l.json")])
    assert out.exit_code == 0, out.output
    coco = json.loads((tmp_path / "l.json").read_text())
    size = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    assert sorted(size.values()) == sorted(sizes)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        W, H = size[a["image_id"]]
        assert -1e-3 <= x and -1e-3 <= y and x + w <= W + 1e-3 and y + h <= H + 1e-3, (a["bbox"], W, H)


def _store_rows(store: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in store.glob("labelsets/*/shards/*.parquet"))


def test_label_fails_when_every_image_fails_and_reruns_do_not_regrow_the_store(tiny_teachers, coco128, tmp_path):
    """A folder of files that are not images: exit 1 naming the label set, not 0 with nothing
    labelled. A rerun retries them (a file may be fixed in between) but a retry that fails the
    same way appends no row; once one image is labelled, a broken neighbour no longer fails the run."""
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "notes.jpg").write_text("not a jpeg")
    (src / "empty.png").write_bytes(b"")
    store = tmp_path / "s"
    cmd = ["label", str(src), "--classes", "person", "--store", str(store), "--teachers", str(tiny_teachers),
           "--runner", "local", "--quiet"]
    r = CliRunner()
    out = r.invoke(main, cmd)
    assert out.exit_code == 1, out.output
    assert "every one of the 2 images failed" in out.output and "holds no labelled image" in out.output
    assert "Traceback" not in out.output
    assert _store_rows(store) == 2
    out = r.invoke(main, cmd)  # the same failures again: nothing new is stored
    assert out.exit_code == 1 and "2 images processed this run" in out.output, out.output
    assert _store_rows(store) == 2
    import shutil

    shutil.copy(coco128 / "images" / "000000000009.jpg", src / "good.jpg")
    out = r.invoke(main, cmd)
    assert out.exit_code == 0, out.output
    assert "1 with labels" in out.output and "now holds 3 images: 1 labeled" in out.output
    assert _store_rows(store) == 3
    (src / "notes.jpg").unlink()  # a different failure (missing) of a retried path is stored
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(src / n) for n in ("notes.jpg", "empty.png", "good.jpg")) + "\n")
    out = r.invoke(main, [*cmd[:1], str(lst), *cmd[2:]])
    assert out.exit_code == 0, out.output
    assert _store_rows(store) == 4 and "missing 1" in out.output


def test_label_refuses_a_ray_address_nothing_answers_at(tiny_teachers, coco128, tmp_path):
    """Ray's own ray.init(address=dead) retries for ever (over 200 s measured); the address is
    probed first and refused in one line, before a label set exists."""
    import socket
    import time

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "s"
    t = time.monotonic()
    out = CliRunner().invoke(main, ["label", str(coco128 / "images"), "--classes", "person", "--store", str(store),
                                    "--teachers", str(tiny_teachers), "--runner", "ray",
                                    "--ray-address", f"127.0.0.1:{port}"])
    assert out.exit_code == 1, out.output
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in out.output and "Traceback" not in out.output
    assert time.monotonic() - t < 60
    assert not store.exists()
