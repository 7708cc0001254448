"""Faults: a full disk, two jobs on one label set, kill -9 of `label` and of a Ray worker, and
`labels verify` on damaged stores. Tiny random teachers on a few coco128 photos."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from distillery.engine.cli import main
from distillery.engine.record import ROW_SCHEMA
from distillery.engine.store import LabelStore, StoreError
from distillery.labeling.ontology import Ontology
from distillery.labeling.teachers import TeacherPreset, labelset_spec
from tests.engine.conftest import writer_held_by_another_process

CLASSES = "person,car,giraffe"


@pytest.fixture(scope="module")
def pool(coco128, tmp_path_factory):
    """Six real photos (the smallest files of coco128, for speed)."""
    d = tmp_path_factory.mktemp("pool")
    for p in sorted((coco128 / "images").glob("*.jpg"), key=lambda p: p.stat().st_size)[:6]:
        shutil.copy(p, d / p.name)
    return d


def label_args(pool, store, preset_path, *extra):
    return ["label", str(pool), "--classes", CLASSES, "--store", str(store), "--teachers", str(preset_path),
            "--runner", "local", "--quiet", *extra]


def rows(store):
    (ls,) = LabelStore(store).labelsets()
    return sorted(ls.iter_records(), key=lambda r: r.path)


def same_labels(a, b):
    """Same images, errors and instances; boxes, scores and masks equal up to float summation
    order. The runs compared differ in torch's thread count (a killed subprocess, an in-process
    rerun, Ray actors with their CPU share), and a reduction over another number of threads
    changes the last bits (measured: scores differ at ~1e-7)."""
    from pycocotools import mask as mask_utils

    assert [r.path for r in a] == [r.path for r in b]
    for x, y in zip(a, b):
        assert (x.image_id, x.error, x.num_instances) == (y.image_id, y.error, y.num_instances)
        np.testing.assert_allclose(x.boxes, y.boxes, atol=1e-3)
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-5)
        if x.masks:
            iou = mask_utils.iou(list(x.masks), list(y.masks), [0] * len(y.masks)).diagonal()
            assert (iou >= 0.99).all(), iou


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- a full disk -------------------------------------------------------------------------------


def test_full_disk_during_a_shard_write_is_one_clear_error_and_a_rerun_resumes(pool, preset_path, tmp_path,
                                                                               monkeypatch):
    """The second shard write fails with ENOSPC (as pyarrow raises it: OSError errno 28) after
    writing part of its temporary file: one error line naming the store and the fix, exit 1, no
    partial shard visible, the first shard kept; the same command then labels only the rest."""
    two = tmp_path / "two"
    two.mkdir()
    for p in sorted(pool.iterdir())[:2]:
        shutil.copy(p, two / p.name)
    store = tmp_path / "store"
    real = pq.write_table
    calls = []

    def full_disk(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:
            Path(where).write_bytes(b"PAR1" + b"\0" * 100)  # what a write cut short leaves behind
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_disk)
    out = CliRunner().invoke(main, label_args(two, store, preset_path, "--shard-size", "1"))
    monkeypatch.setattr(pq, "write_table", real)
    assert out.exit_code == 1 and "Traceback" not in out.output
    errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
    (ls,) = LabelStore(store).labelsets()
    assert errors == [
        f"Error: store {store}: cannot write a shard of label set {ls.id}: no space left on device (ENOSPC); free "
        "space on that disk (or give --store a folder on another disk), then rerun the same command to resume "
        "(this run stored 1 image)"
    ]
    assert Path(calls[1]).name.startswith(".tmp-") and not Path(calls[1]).exists()  # the partial file is gone
    assert sorted(os.listdir(ls.shard_dir)) == [p.name for p in ls.shards()] and len(ls.shards()) == 1
    assert LabelStore(store).open().shard_rows == {ls.shards()[0].name: 1}
    again = CliRunner().invoke(main, label_args(two, store, preset_path, "--shard-size", "1"))
    assert again.exit_code == 0, again.output
    assert "1 images processed this run (1 already in the store)" in again.output
    assert [r.path for r in rows(store)] == sorted(str(p) for p in two.iterdir())


# -- two jobs on one label set ------------------------------------------------------------------


def test_a_second_label_on_a_label_set_being_written_is_refused_naming_the_holder(pool, preset_path, tmp_path):
    store = tmp_path / "store"
    onto, preset = Ontology.from_classes(CLASSES), TeacherPreset.load(preset_path)
    ls = LabelStore(store).create(labelset_spec(onto, preset))  # the label set `label` below opens
    with writer_held_by_another_process(store) as holder:
        out = CliRunner().invoke(main, label_args(pool, store, preset_path))
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert out.output.splitlines()[-1] == (
        f"Error: label set {ls.id} is being written by another job (pid {holder.pid}, lock {ls.root / '.lock'}); "
        "wait for it to finish or stop it, then rerun")
    assert ls.shards() == [] and not list(ls.shard_dir.glob(".tmp-*"))  # it wrote nothing


# -- kill -9 of a local `label`: flushed by time, resumed without recomputing ---------------------


@pytest.mark.slow
def test_kill_9_of_label_keeps_the_shards_flushed_by_time_and_a_rerun_skips_them(pool, preset_path, tmp_path):
    """--shard-size 256 over 6 images: without the time flush a kill -9 would keep nothing. With
    --flush-seconds 0.2 the shards written before the kill stay byte-identical, a second `label`
    meanwhile is refused, and the rerun labels only the images not yet stored; the result equals
    an uninterrupted run."""
    store = tmp_path / "cut"
    args = label_args(pool, store, preset_path, "--flush-seconds", "0.2", "--block-size", "1")
    exe = str(Path(sys.executable).parent / "distillery")
    proc = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard_dir = None
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, "label ended before it could be interrupted"
        dirs = list((store / "labelsets").glob("*/shards"))
        if dirs and [p for p in dirs[0].glob("*.parquet") if not p.name.startswith(".")]:
            shard_dir = dirs[0]
            break
        time.sleep(0.05)
    assert shard_dir is not None, "no shard within 300 s"
    second = CliRunner().invoke(main, args)  # while the first one runs
    assert second.exit_code == 1 and f"being written by another job (pid {proc.pid}," in second.output
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {k: v for k, v in file_digests(shard_dir).items() if not k.startswith(".")}
    done = sum(pq.read_metadata(shard_dir / k).num_rows for k in kept)
    assert 1 <= done < 6, f"interrupted mid-run, {done} of 6 stored"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert f"{6 - done} images processed this run ({done} already in the store)" in again.output
    assert {k: v for k, v in file_digests(shard_dir).items() if k in kept} == kept  # not rewritten
    full = tmp_path / "full"
    assert CliRunner().invoke(main, label_args(pool, full, preset_path)).exit_code == 0
    same_labels(rows(full), rows(store))
    from distillery.engine.verify import verify_store

    assert verify_store(store).problems == []


# -- kill -9 of one Ray worker ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_kill_9_of_a_ray_actor_mid_run_is_retried_and_the_labels_equal_an_uninterrupted_run(
        pool, preset_path, tmp_path, ray_local):
    """While the segmenter's actor runs a batch (its process title ends in ``.submit``), SIGKILL
    it: Ray restarts it in a new process and resubmits the batch (Ray Data's actor defaults,
    see engine/job.py); the job finishes with every image once and the same labels as an
    uninterrupted (local) run."""
    import threading

    import psutil

    from distillery.engine.images import list_source
    from distillery.engine.job import run_label_job
    from distillery.labeling.teachers import teacher_stages

    onto, preset = Ontology.from_classes(CLASSES), TeacherPreset.load(preset_path)
    paths = list_source(pool)
    killed, seen, done = [], set(), threading.Event()

    def hunt():
        while not done.is_set():
            for p in psutil.Process().children(recursive=True):
                try:
                    title = (p.cmdline() or [""])[0]
                    if not title.startswith("ray::MapWorker(MapBatches(SegmentStage)"):
                        continue
                    seen.add(p.pid)
                    if not killed and title.endswith(".submit"):
                        p.kill()
                        killed.append(p.pid)
                except psutil.Error:
                    continue
            time.sleep(0.02)

    hunter = threading.Thread(target=hunt, daemon=True)
    hunter.start()
    ls = LabelStore(tmp_path / "ray").create(labelset_spec(onto, preset))
    try:
        s = run_label_job(paths, ls, teacher_stages(preset, onto), runner="ray", shard_size=2, decode_batch_size=1,
                          progress=False)
    finally:
        done.set()
        hunter.join()
    assert len(killed) == 1 and s.processed == 6 and s.labeled == 6
    assert seen - set(killed), "no new segmenter process after the kill"
    ref = LabelStore(tmp_path / "local").create(labelset_spec(onto, preset))
    run_label_job(paths, ref, teacher_stages(preset, onto), runner="local", progress=False)
    same_labels(rows(tmp_path / "local"), rows(tmp_path / "ray"))


# -- labels verify ------------------------------------------------------------------------------------


def _store_with_labels(root: Path) -> Path:
    """Two shards of 2 and 1 records with masks, and a curation version, written by the library."""
    from pycocotools import mask as mask_utils

    from distillery.engine.record import LabelRecord

    ls = LabelStore(root).create({"ontology": {"classes": ["a", "b"], "prompts": [["a", "a"], ["b", "b"]]}},
                                 name="v")
    with ls.writer(shard_size=2) as w:
        for k in range(3):
            m = np.zeros((20, 30, 2), np.uint8, order="F")
            m[2:8, 3:9 + k, 0] = 1
            m[10:15, 1:4, 1] = 1
            w.add(LabelRecord(f"id{k}", f"img{k}.jpg", 30, 20, 2, boxes=[[3, 2, 9 + k, 8], [1, 10, 4, 15]],
                              scores=[[0.9, 0.1], [0.2, 0.7]],
                              masks=[dict(r) for r in mask_utils.encode(m)]).to_row())
    from distillery.engine.store import CURATION_SCHEMA

    ls.commit_curation(pa.Table.from_pylist([{"image_id": "id0", "instance_id": None, "decision": "accept",
                                              "label": None, "source": "manual"}], schema=CURATION_SCHEMA))
    return root


def verify(store, *extra):
    return CliRunner().invoke(main, ["labels", "verify", "--store", str(store), *extra])


def test_verify_passes_a_clean_store_and_reports_each_kind_of_damage(tmp_path):
    clean = _store_with_labels(tmp_path / "clean")
    out = verify(clean)
    assert out.exit_code == 0, out.output
    assert out.output.splitlines() == [
        "checked 1 label set(s), 2 shard(s), 3 rows, 6 masks, 1 curation version(s): no problem(s)"]

    def damaged(kind):
        root = _store_with_labels(tmp_path / kind)
        (ls,) = LabelStore(root).labelsets()
        return root, ls, ls.shards()

    root, ls, (first, second) = damaged("truncated")
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])
    out = verify(root)
    assert out.exit_code == 1
    assert out.output.splitlines()[0].startswith(f"{first}: unreadable Parquet (")
    assert out.output.splitlines()[-1].endswith(": 1 problem(s)")

    root, ls, (first, second) = damaged("count")
    ls.update_manifest(lambda m: m["shards"].__setitem__(second.name, 2))
    out = verify(root)
    assert out.exit_code == 1
    assert out.output.splitlines()[0] == (f"{second}: 1 rows, the manifest records 2; the shard or manifest.json was "
                                          "altered: restore them from a backup")

    root, ls, (first, second) = damaged("rle")
    t = pq.read_table(second)
    counts = t.column("mask_counts").to_pylist()
    counts[0][1] = counts[0][1][:-2]  # the second mask of img2.jpg loses its last two characters
    t = t.set_column(t.schema.get_field_index("mask_counts"), "mask_counts",
                     pa.array(counts, t.schema.field("mask_counts").type))
    pq.write_table(t.cast(ROW_SCHEMA), second)
    out = verify(root)
    assert out.exit_code == 1
    (line,) = [x for x in out.output.splitlines() if x.startswith(str(second))]
    assert line.startswith(f"{second}: row 0 (img2.jpg) instance 1: mask runs cover ")

    root, ls, (first, second) = damaged("orphan")
    orphan = ls.shard_dir / ".tmp-00000000000000000001-deadbeef.parquet"
    orphan.write_bytes(b"PAR1 cut short")
    ls.update_manifest(lambda m: m["shards"].__setitem__(second.name, 5))  # and one more problem, not an orphan
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
    out = verify(root)
    assert out.exit_code == 1
    assert f"{orphan}: orphaned temporary file (14 bytes) left by an interrupted write; `distillery labels verify " \
           "--repair` removes it" in out.output.splitlines()
    out = verify(root, "--repair")
    assert out.exit_code == 1  # the row count problem is still there: --repair removes orphans only
    assert out.output.splitlines()[0] == f"removed {orphan}"
    after = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
    assert set(before) - set(after) == {str(orphan)}
    assert {k: v for k, v in before.items() if k != str(orphan) and not k.endswith(".lock")} == \
           {k: v for k, v in after.items() if not k.endswith(".lock")}
    ls.update_manifest(lambda m: m["shards"].__setitem__(second.name, 1))
    assert verify(root).exit_code == 0


def test_verify_reports_a_shard_missing_from_the_manifest_and_a_label_set_being_written(tmp_path):
    root = _store_with_labels(tmp_path / "s")
    (ls,) = LabelStore(root).labelsets()
    first = ls.shards()[0]
    ls.update_manifest(lambda m: m["shards"].pop(first.name))  # a kill -9 between the rename and the record
    out = verify(root)
    assert out.exit_code == 1 and out.output.splitlines()[0].startswith(f"{first}: not in the manifest's shard list")
    with ls.writer():  # the next writer records it
        pass
    assert verify(root).exit_code == 0
    with ls.writer():
        out = verify(root, "--labelset", "v")
    assert out.exit_code == 1 and f"label set {ls.id} is being written by another job (pid {os.getpid()}," in out.output


def test_rle_runs_parse_like_the_coco_api(tmp_path):
    """rle_counts on pycocotools' encodings equals the runs counted straight from the mask
    (column-major, starting with background), on random masks of several sizes."""
    from pycocotools import mask as mask_utils

    from distillery.engine.verify import rle_counts, rle_problem

    rng = np.random.default_rng(0)
    for h, w, p in [(1, 1, 0.5), (20, 30, 0.0), (20, 30, 1.0), (64, 48, 0.3), (480, 640, 0.002)]:
        m = (rng.random((h, w)) < p).astype(np.uint8)
        if p == 0.3:
            m[:, :] = m.cumsum(0) % 2  # long and short runs
        flat = m.flatten(order="F")
        change = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.r_[0, change, flat.size])
        if flat[0] == 1:
            runs = np.r_[0, runs]
        rle = mask_utils.encode(np.asfortranarray(m))
        np.testing.assert_array_equal(rle_counts(rle["counts"]), runs)
        assert rle_problem(rle, h, w) is None
    assert rle_problem({"size": [2, 2], "counts": b"0"}, 2, 2) == "mask runs cover 0 pixels, not height*width = 4"
    assert rle_problem({"size": [2, 2], "counts": b"\x01"}, 2, 2) == "mask counts do not parse: characters outside '0'..'o'"


def test_verify_reports_a_copied_shard_and_an_image_labelled_twice(tmp_path):
    import shutil

    root = _store_with_labels(tmp_path / "copy")
    (ls,) = LabelStore(root).labelsets()
    first, second = ls.shards()
    copy = ls.shard_dir / ("z" + first.name)  # sorts after both: the copy repeats the first's 2 labelled rows
    shutil.copy(first, copy)
    out = verify(root)
    assert out.exit_code == 1
    assert (f"{copy}: 2 labelled row(s) repeat those of {first.name} (a copied shard?); move the copy out of the "
            "store (`distillery label` never labels an image twice)") in out.output.splitlines()
    copy.unlink()
    assert verify(root).exit_code == 0

    t = pq.read_table(second)  # img2.jpg given img0's image id: the same bytes labelled under two paths
    t = t.set_column(t.schema.get_field_index("image_id"), "image_id", pa.array(["id0"]))
    pq.write_table(t.cast(ROW_SCHEMA), second)
    out = verify(root)
    assert out.exit_code == 1
    assert (f"{second}: img2.jpg is labelled but has the same bytes as img0.jpg, labelled too (the writer stores such "
            "a file as a duplicate error); restore the shard from a backup") in out.output.splitlines()


def test_verify_names_a_manifest_of_the_wrong_shape_a_damaged_header_and_a_folder_where_a_file_belongs(tmp_path):
    """Each is one line naming the file, exit 1, never a traceback: a manifest without
    ``ontology`` (a KeyError), with a string for it (an AttributeError), with a list for
    ``shards``; a shard whose ``PAR1`` header bytes are overwritten (pyarrow reads only the
    footer, so it read the rows fine); a folder named like a temp file (``--repair`` leaves it
    and still removes the real orphans); a folder where the manifest or lock file belongs. A
    manifest without shard counts passes, with a note that they went unchecked."""
    import json

    def store(kind):
        root = _store_with_labels(tmp_path / kind)
        (ls,) = LabelStore(root).labelsets()
        return root, ls

    for change, says in [(lambda m: m.pop("ontology"), "'ontology' must be an object with a 'classes' list"),
                         (lambda m: m.__setitem__("ontology", "x"), "'ontology' must be an object with a 'classes' list"),
                         (lambda m: m.__setitem__("shards", list(m["shards"])), "'shards' must map shard file names"),
                         (lambda m: m["shards"].__setitem__(next(iter(m["shards"])), "2"), "'shards' must map")]:
        root, ls = store("manifest")
        path = ls.root / "manifest.json"
        m = json.loads(path.read_text())
        change(m)
        path.write_text(json.dumps(m))
        out = verify(root)
        assert out.exit_code == 1 and "Traceback" not in out.output, out.output
        assert out.output.splitlines()[0].startswith(f"{path} is damaged: {says}"), out.output
        with pytest.raises(StoreError, match="is damaged"):  # every other command says so too
            LabelStore(root).open("v")
        shutil.rmtree(root)

    root, ls = store("magic")
    first = ls.shards()[0]
    data = bytearray(first.read_bytes())
    data[:4] = b"XXXX"
    first.write_bytes(bytes(data))
    assert pq.read_table(first).num_rows == 2  # what verify used to rely on
    out = verify(root)
    assert out.exit_code == 1
    assert out.output.splitlines()[0].startswith(f"{first}: does not start with Parquet's magic bytes b'PAR1' "
                                                 "(got b'XXXX')"), out.output

    root, ls = store("tmpdir")
    folder = ls.shard_dir / ".tmp-dir"
    folder.mkdir()
    orphan = ls.shard_dir / ".tmp-00000000000000000009-cafe.parquet"
    orphan.write_bytes(b"x")
    out = verify(root, "--repair")
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    assert f"removed {orphan}" in out.output.splitlines() and not orphan.exists() and folder.is_dir()
    assert any(x.startswith(f"{folder}: a folder with a temporary file's name") for x in out.output.splitlines())

    root, ls = store("lockdir")
    (ls.root / ".lock").unlink(missing_ok=True)
    (ls.root / ".lock").mkdir()
    out = verify(root)
    assert out.exit_code == 1 and f"{ls.root / '.lock'} is a folder, but it is label set {ls.id}'s lock file" \
        in out.output, out.output

    root, ls = store("manifestdir")
    path = ls.root / "manifest.json"
    path.unlink()
    path.mkdir()
    out = verify(root)
    assert out.exit_code == 1 and out.output.splitlines()[0].startswith(f"{path} cannot be read (Is a directory)")

    root, ls = store("nocounts")
    ls.update_manifest(lambda m: m.pop("shards"))
    out = verify(root)
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0] == (f"note: {ls.root / 'manifest.json'}: no shard row counts recorded (a label "
                                          "set written before the manifest recorded them): row counts not checked; "
                                          "the next `distillery label` run on this label set records them")
