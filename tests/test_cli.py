from __future__ import annotations

import json

from click.testing import CliRunner
from pycocotools.coco import COCO

from distillery.engine.cli import main


def test_cli_label_info_export(tiny_teachers, coco128, tmp_path):
    r = CliRunner()
    lst = tmp_path / "few.txt"
    lst.write_text("\n".join(str(coco128 / "images" / n) for n in ["000000000009.jpg", "000000000025.jpg"]) + "\nmissing.jpg\n")
    store = tmp_path / "store"
    out = r.invoke(main, ["label", str(lst), "--classes", "person,giraffe", "--store", str(store),
                          "--teachers", str(tiny_teachers), "--runner", "local", "--quiet"])
    assert out.exit_code == 0, out.output
    assert "3 images processed this run" in out.output and "missing 1" in out.output
    info = r.invoke(main, ["labels", "info", "--store", str(store), "--json"])
    (row,) = json.loads(info.output)
    assert row["images"] == 3 and row["labeled"] == 2 and row["errors"] == {"missing": 1}
    out = r.invoke(main, ["labels", "export", "--store", str(store), "--format", "coco", "--out", str(tmp_path / "l.json")])
    assert out.exit_code == 0, out.output
    coco = COCO(str(tmp_path / "l.json"))
    assert len(coco.imgs) == 2 and len(coco.getAnnIds()) == row["instances"]
    out = r.invoke(main, ["labels", "export", "--store", str(store), "--format", "yolo-seg", "--out", str(tmp_path / "y")])
    assert out.exit_code == 0 and (tmp_path / "y" / "data.yaml").is_file()


def test_cli_user_errors_are_clear(tmp_path, tiny_teachers):
    r = CliRunner()
    out = r.invoke(main, ["label", str(tmp_path / "nope"), "--classes", "a", "--store", str(tmp_path / "s"),
                          "--teachers", str(tiny_teachers)])
    assert out.exit_code == 1 and "does not exist" in out.output and "Traceback" not in out.output
    out = r.invoke(main, ["label", str(tmp_path), "--store", str(tmp_path / "s")])
    assert out.exit_code == 1 and "exactly one of --classes or --ontology" in out.output
    out = r.invoke(main, ["label", str(tmp_path), "--classes", "a", "--store", str(tmp_path / "s"),
                          "--teachers", str(tmp_path / "none.yaml")])
    assert out.exit_code == 1 and "neither a file nor a shipped teachers preset" in out.output
    out = r.invoke(main, ["labels", "export", "--store", str(tmp_path / "empty"), "--format", "coco", "--out", "x.json"])
    assert out.exit_code == 1 and f"--store {tmp_path / 'empty'} does not exist" in out.output
    (tmp_path / "empty" / "labelsets").mkdir(parents=True)
    out = r.invoke(main, ["labels", "export", "--store", str(tmp_path / "empty"), "--format", "coco", "--out", "x.json"])
    assert out.exit_code == 1 and "no label sets" in out.output
    assert "Example" in r.invoke(main, ["label", "--help"]).output
