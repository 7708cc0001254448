"""``distillery label``, ``distillery labels ...`` and ``distillery teachers ...``: the labelling
stage's commands (registered on the root group through the ``distillery.commands`` entry points)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from distillery.engine.cli_errors import UserError, fail_cleanly
from distillery.engine.cli_types import CocoJson, Config, FloatRange, ImageFolder, ImageSource, Output, Store
from distillery.engine.images import DEFAULT_MAX_PIXELS

def _valid_name(ctx, param, value):
    """click callback: ``--name`` checked by :func:`distillery.engine.names.check_name` at parse time."""
    from distillery.engine.names import check_name
    from distillery.engine.store import ID_PREFIX

    if value is None:
        return None
    try:
        return check_name(value, ID_PREFIX)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def name_option(what: str = "label set"):
    """The ``--name NAME`` option of commands that create a named label set."""
    return click.option("--name", default=None, callback=_valid_name, metavar="NAME",
                        help=f"Name of the {what}, e.g. coco128-gt: letters, digits, '-_.'; unique in the store. "
                             "Other commands take it as --labelset NAME.")


@click.command("label")
@click.argument("sources", nargs=-1, required=True, type=ImageSource())
@click.option("--classes", help='Comma-separated class names, each its own prompt: "person,car,traffic light".')
@click.option("--ontology", "ontology_path", type=Config("ontology"),
              help="YAML mapping prompt: class, or a shipped name (coco80).")
@click.option("--store", required=True, type=Store(must_exist=False), help="Label store directory (new or existing).")
@click.option("--teachers", "preset_path", default="default", show_default=True, type=Config("teachers"),
              help="Teachers preset: a YAML file or a shipped name (distillery configs list).")
@click.option("--runner", type=click.Choice(["auto", "ray", "local"]), default="auto", show_default=True,
              help="ray: Ray Data pipeline; local: same stages in this process, one batch at a time; auto: "
                   "local for fewer than 32 images to label (Ray's start-up would not pay back), else ray.")
@click.option("--ray-address", default=None, help="Address of an existing Ray cluster (default: start a local one).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Images above this many pixels become error records.")
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per Parquet shard.")
@click.option("--flush-seconds", type=FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Also write a shard once its oldest image has waited this long, so a crash loses at most about "
                   "this much finished work (plus the blocks still in the pipeline).")
@click.option("--block-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per decode task (Ray block).")
@click.option("--quiet", is_flag=True, help="No progress bar, no start-up lines.")
@name_option()
@fail_cleanly
def label(sources, classes, ontology_path, store, preset_path, runner, ray_address, max_pixels, shard_size,
          flush_seconds, block_size, quiet, name):
    """Label images with the teachers into a label set of STORE.

    SOURCES are folders (searched recursively), text files listing image paths, or COCO
    JSON files. Re-running the same command resumes an interrupted run.

    \b
    Example:
      distillery teachers tiny teachers/
      distillery label ../shared/data/coco128/images --classes "person,car,dog" \\
          --store store/ --teachers teachers/teachers.yaml --name coco128-tiny
    """
    if bool(classes) == bool(ontology_path):  # before the imports below (torch, Ray: seconds)
        raise UserError("give exactly one of --classes or --ontology")
    from distillery.engine.images import list_sources
    from distillery.engine.job import run_label_job
    from distillery.engine.store import LabelStore
    from distillery.labeling.ontology import Ontology, OntologyError
    from distillery.labeling.teachers import PresetError, TeacherPreset, labelset_spec, teacher_stages

    if ray_address:
        from distillery.engine.ray_local import check_ray_address

        check_ray_address(ray_address)  # before a label set exists
    paths = list_sources(sources)  # before any model or tokenizer loads
    if not paths:
        raise UserError(f"no images found in {', '.join(sources)} (suffixes .jpg .jpeg .png .bmp .webp .tif .gif)")
    try:
        onto = Ontology.from_classes(classes) if classes else Ontology.load(ontology_path)
    except OntologyError as e:
        raise UserError(str(e)) from e  # names the file
    try:
        preset = TeacherPreset.load(preset_path)
        chunks = preset.check_detector(onto, preset_path)  # tokenizes the ontology; no weights loaded
        if not ray_address:  # the job runs on this machine
            preset.check_device_here(preset_path)
    except PresetError as e:
        raise UserError(str(e)) from e
    except OntologyError as e:
        raise UserError(f"{ontology_path or '--classes'}: {e}") from e
    ls = LabelStore(store).create(labelset_spec(onto, preset), extra={"teachers_preset": preset.to_dict()}, name=name)
    click.echo(f"label set {ls.id}: {len(paths)} images, {len(onto.classes)} classes in {chunks} prompt "
               f"chunk(s), store {store}")
    s = run_label_job(paths, ls, teacher_stages(preset, onto), runner=runner, ray_address=ray_address,
                      max_pixels=max_pixels, shard_size=shard_size, flush_seconds=flush_seconds,
                      decode_batch_size=block_size, progress=not quiet,
                      log=None if quiet else lambda line: click.echo(line, err=True))
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "none"
    click.echo(
        f"done: {s.processed} images processed this run ({s.skipped} already in the store), "
        f"{s.labeled} with labels, {s.instances} instances; errors: {errors}; "
        f"{s.images_per_second:.2f} images/s over {s.seconds:.1f} s"
    )
    if s.processed:
        click.echo(_time_line(s))
    totals = _echo_store_totals(ls)
    if s.processed and not totals.labeled and sum(s.errors.values()) == s.processed:
        raise UserError(f"every one of the {s.processed} images failed ({errors}) and label set {ls.id} holds no "
                        "labelled image: fix or remove the files listed above and rerun the same command")


def _time_line(s) -> str:
    """Where a label job's time went, one line (:class:`distillery.engine.job.JobSummary`)."""
    busy = ", ".join(f"{k} {v:.1f} s" for k, v in s.busy_seconds.items())
    ready = ", ".join(f"{k} {v:.1f} s" for k, v in s.ready_seconds.items())
    loads = ", ".join(f"{k} {v:.1f} s" for k, v in s.load_seconds.items())
    return (f"time: runner {s.runner}, {s.startup_seconds:.1f} s before the first labelled images (teachers ready "
            f"after {ready or '-'}, of which loading {loads or '-'}); busy: {busy}")


def _echo_store_totals(ls, show: int = 10):
    """Print a label set's totals and first error records; returns its LabelSetCounts."""
    c = ls.counts()
    errors = ", ".join(f"{k} {v}" for k, v in sorted(c.errors.items())) or "none"
    named = f" ({ls.name})" if ls.name else ""
    click.echo(f"label set {ls.id}{named} now holds {c.images} images: {c.labeled} labeled, {c.instances} instances, "
               f"errors: {errors}")
    errs = c.error_records
    for path, reason in errs[:show]:
        click.echo(f"  {path}: {reason}")
    if len(errs) > show:
        click.echo(f"  ... {len(errs) - show} more: distillery labels info --store STORE --errors")
    return c


@click.group("labels")
def labels() -> None:
    """Inspect, export and import label sets."""


@labels.command("info")
@click.option("--store", required=True, type=Store())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--errors", "list_errors", is_flag=True, help="Also list every error record: path and reason.")
@fail_cleanly
def labels_info(store, as_json, list_errors):
    """List the label sets of STORE with their counts.

    \b
    Example:
      distillery labels info --store store/
    """
    from distillery.engine.store import LabelStore

    rows = []
    for ls in LabelStore(store).labelsets():
        c = ls.counts()
        det = ls.manifest.get("teachers", {})
        rows.append({
            "labelset": ls.id, "name": ls.name, "kind": ls.manifest.get("kind"), "created": ls.manifest.get("created"),
            "classes": len(ls.classes), "images": c.images, "labeled": c.labeled, "instances": c.instances,
            "errors": dict(c.errors), "teachers": det,
            **({"error_records": [{"path": p, "error": e} for p, e in c.error_records]} if list_errors else {}),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no label sets in {store}")
    width = max([len(r["name"] or "-") for r in rows] + [4])
    if rows:
        click.echo(f"{'name':<{width}}  {'id':<19}  {'kind':<7} created")
    for r in rows:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
        t = r["teachers"]
        who = (t.get("detector", {}).get("model") or t.get("teacher", {}).get("model")
               or t.get("import", {}).get("file") or "?")
        click.echo(
            f"{r['name'] or '-':<{width}}  {r['labelset']}  {r['kind']:<7} {r['created']}  {r['classes']} classes  "
            f"{r['images']} images "
            f"({r['labeled']} labeled, {r['instances']} instances, errors: {errs})  from {who}"
        )
        for e in r.get("error_records", []):
            click.echo(f"  {e['path']}: {e['error']}")


def _is_distillery_export(path: Path) -> bool:
    """True for a COCO file an earlier ``labels export`` wrote (rerunning a command replaces
    its own output; any other file needs --overwrite)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    return '"description": "Distillery label set export"' in head


@labels.command("export")
@click.option("--store", required=True, type=Store())
@click.option("--labelset", default=None, metavar="NAME|ID",
              help="Label set name, id or unique id prefix (default: the store's only one).")
@click.option("--format", "fmt", type=click.Choice(["coco", "yolo-seg"]), required=True)
@click.option("--out", required=True, type=click.Path(), help="coco: a .json file; yolo-seg: a directory.")
@click.option("--min-score", type=float, default=0.0, show_default=True, help="Drop instances below this box score.")
@click.option("--val-fraction", type=FloatRange(0, 1), default=0.1, show_default=True,
              help="yolo-seg: share of images in val.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (coco: the file; yolo-seg: its images/ and labels/).")
@fail_cleanly
def labels_export(store, labelset, fmt, out, min_score, val_fraction, overwrite):
    """Export a label set as a COCO instances file or an ultralytics YOLO-seg dataset.

    \b
    Example:
      distillery labels export --store store/ --format coco --out labels.json
      distillery labels export --store store/ --labelset coco128-gt --format yolo-seg --out yolo/
    """
    from distillery.engine.filekinds import file_in_the_way
    from distillery.engine.store import LabelStore

    file_in_the_way(out, "--out", "labels.json" if fmt == "coco" else "yolo/")
    if fmt == "coco" and Path(out).is_dir():
        raise UserError(f"--out {out} is a folder; --format coco writes a .json file (e.g. labels.json)")
    if Path(out).resolve().is_relative_to((Path(store) / "labelsets").resolve()):
        raise UserError(f"--out {out} is inside the label sets of {store} (their shards and manifests); write "
                        "exports elsewhere, e.g. beside them in the store folder")
    if fmt == "coco" and Path(out).exists() and not overwrite and not _is_distillery_export(Path(out)):
        raise UserError(f"--out {out} exists and is not a Distillery export; pass --overwrite to replace it, or "
                        "choose another file")
    if fmt == "yolo-seg" and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; --format yolo-seg writes a folder (e.g. yolo/)")
    ls = LabelStore(store).open(labelset)
    if fmt == "coco":
        from distillery.labeling.coco import records_to_coco

        coco = records_to_coco(ls.iter_records(), ls.classes, min_score)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(coco))
        click.echo(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations from {ls.id}")
    else:
        from distillery.labeling.yolo import export_yolo_seg

        c = export_yolo_seg(ls, out, val_fraction, min_score, overwrite=overwrite)
        click.echo(f"wrote {out}: {c['train']} train / {c['val']} val images, {c['instances']} instances from {ls.id}")
        if c["train"] and not c["val"]:
            click.echo(f"warning: no validation image (--val-fraction {val_fraction} of {c['train']} images picked "
                       "none; the split is by image id): ultralytics needs one to validate; raise --val-fraction "
                       "or validate on another set", err=True)
        for path in c["missing_images"]:
            click.echo(f"  skipped (image no longer there): {path}")


@labels.command("import")
@click.option("--coco", "coco_path", required=True, type=CocoJson(), help="COCO instances JSON.")
@click.option("--images", "images_dir", required=True, type=ImageFolder(),
              help="The folder the COCO file_name entries are relative to.")
@click.option("--store", required=True, type=Store(must_exist=False), help="Label store directory (new or existing).")
@name_option()
@fail_cleanly
def labels_import(coco_path, images_dir, store, name):
    """Import an existing COCO instances file (human labels) as a label set.

    \b
    Example:
      distillery labels import --coco annotations.json --images images/ --store store/ --name coco128-gt
    """
    from distillery.engine.store import LabelStore
    from distillery.labeling.coco import CocoError, import_coco

    try:
        ls, st = import_coco(LabelStore(store), coco_path, images_dir, name=name)
    except CocoError as e:
        raise UserError(str(e)) from e
    click.echo(
        f"imported {st['images']} images ({st['added']} added), {st['instances']} instances "
        f"({st['crowd']} crowd), {st['box_masks']} box-only masks, {st['dropped_annotations']} annotations "
        "dropped with their failed images"
    )
    _echo_store_totals(ls)


@labels.command("verify")
@click.option("--store", required=True, type=Store())
@click.option("--labelset", default=None, metavar="NAME|ID", help="Check only this label set (default: all).")
@click.option("--repair", is_flag=True, help="Remove orphaned temporary files (nothing else is changed).")
@fail_cleanly
def labels_verify(store, labelset, repair):
    """Check every shard (readable Parquet, the label row schema, the row count the manifest
    records), every record and RLE mask, every curation version and the manifests, and list
    orphaned temporary files. One line per problem; exit status 0 when there are none, 1 otherwise.

    \b
    Example:
      distillery labels verify --store store/
      distillery labels verify --store store/ --labelset coco128-tiny --repair
    """
    from distillery.engine.verify import verify_store

    rep = verify_store(store, labelset, repair=repair)
    for p in rep.removed:
        click.echo(f"removed {p}")
    for p in rep.problems:
        click.echo(p)
    for n in rep.notes:
        click.echo(f"note: {n}")
    click.echo(f"checked {rep.labelsets} label set(s), {rep.shards} shard(s), {rep.rows} rows, {rep.masks} masks, "
               f"{rep.curation_versions} curation version(s): {len(rep.problems) or 'no'} problem(s)")
    if rep.problems:
        raise SystemExit(1)


@labels.command("rename")
@click.option("--store", required=True, type=click.Path(file_okay=False, exists=True))
@click.argument("labelset", metavar="NAME|ID")
@click.argument("new_name", metavar="NEW_NAME", callback=_valid_name)
@fail_cleanly
def labels_rename(store, labelset, new_name):
    """Give a label set a new name (its id and labels stay). Commands and scripts that used
    the old name must use the new one.

    \b
    Example:
      distillery labels rename --store store/ ls-3f0a coco128-gt
    """
    from distillery.engine.store import LabelStore

    ls = LabelStore(store).rename(labelset, new_name)
    click.echo(f"label set {ls.id} is now named {ls.name}")


@click.group("teachers")
def teachers() -> None:
    """Teacher models."""


@teachers.command("tiny")
@click.argument("out_dir", type=Output(folder=True, example="teachers/"))
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="tiny: width-32 models, seconds per image on a CPU; full: the real architectures "
                   "(Grounding DINO-T, SAM ViT-B, ~1 GB on disk; SAM 3, 3.4 GB) at random weights, for benchmarks.")
@click.option("--kind", "kinds", multiple=True, metavar="KIND",
              type=click.Choice(["grounding-dino", "mm-grounding-dino", "owlv2", "sam", "sam2", "sam-hq", "sam3"]),
              help="Teacher kind (repeatable, at most one per role): detector grounding-dino (default), "
                   "mm-grounding-dino or owlv2; segmenter sam (default), sam2 or sam-hq; or alone the "
                   "grounded segmenter sam3 (detects and segments: no detector or segmenter).")
def teachers_tiny(out_dir, seed, size, kinds=()):
    """Write RANDOM-WEIGHT detector and segmenter teachers (Grounding DINO and SAM, or --kind) plus a
    preset to OUT_DIR.

    Their labels are meaningless; they let the whole pipeline run offline (tiny), or measure
    what the real architectures cost (full).

    --kind sam2 or --kind sam-hq writes a transformers SAM 2 / SAM-HQ of that architecture
    (folder OUT_DIR/sam2 or OUT_DIR/sam-hq, loaded by from_pretrained like real weights)
    instead of the segment-anything SAM. --kind sam3 writes a SAM 3 (OUT_DIR/sam3) and a
    preset whose `teacher: {kind: sam3}` labels alone.

    \b
    Example:
      distillery teachers tiny teachers/ && distillery label imgs/ --classes cat --store s/ --teachers teachers/teachers.yaml
      distillery teachers tiny owl/ --kind owlv2 --kind sam2
      distillery teachers tiny sam3/ --kind sam3
    """
    from distillery.labeling.tiny import TINY_DETECTOR_KINDS, add_tiny_detector, write_tiny_teachers
    from distillery.labeling.tiny_grounded import TINY_GROUNDED_KINDS, write_tiny_grounded_teachers

    grounded = [k for k in kinds if k in TINY_GROUNDED_KINDS]
    if grounded:
        if len(kinds) > 1:
            raise UserError(f"--kind {grounded[0]} is a grounded segmenter: it detects and segments alone; give it "
                            f"without other kinds, got {', '.join(kinds)}")
        try:
            path = write_tiny_grounded_teachers(out_dir, grounded[0], seed, size=size)
        except OSError as e:
            raise UserError(f"cannot write {out_dir}: {e.strerror or e}; choose a writable folder") from e
        click.echo(f"wrote {size} random teachers ({grounded[0]} grounded segmenter) and preset {path}")
        return

    detector_kinds = [k for k in kinds if k in TINY_DETECTOR_KINDS or k == "grounding-dino"]
    segmenters = [k for k in kinds if k in ("sam", "sam2", "sam-hq")]
    for role, given in (("detector", detector_kinds), ("segmenter", segmenters)):
        if len(given) > 1:
            raise UserError(f"--kind: give at most one {role} kind, got {', '.join(given)}")
    try:
        path = write_tiny_teachers(out_dir, seed, size=size, segmenter=segmenters[0] if segmenters else "sam")
        if detector_kinds and detector_kinds[0] in TINY_DETECTOR_KINDS:
            add_tiny_detector(path, detector_kinds[0], seed, size=size)
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}; choose a writable folder") from e
    detector = detector_kinds[0] if detector_kinds else "grounding-dino"
    click.echo(f"wrote {size} random teachers ({detector} detector, {segmenters[0] if segmenters else 'sam'} "
               f"segmenter) and preset {path}")


@teachers.command("eval")
@click.option("--teachers", "presets", multiple=True, required=True, type=Config("teachers"), metavar="PRESET",
              help="A teachers preset (YAML file or shipped name); repeat it. The first is the baseline of the deltas.")
@click.option("--labelset", required=True, metavar="NAME|ID",
              help="The GT: a label set from `distillery labels import` (human labels; its latest curation applies).")
@click.option("--store", required=True, type=Store(), help="Label store holding the GT; teacher labels are cached in it.")
@click.option("--out", type=Output(folder=True, example="teacher-eval/"), default="teacher-eval", show_default=True,
              help="Report folder.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate the first N images (by path).")
@click.option("--val-only/--all-images", default=None,
              help="Evaluate the validation split only, or every GT image. Default: --val-only when a teacher has a "
                   "finetune.json beside its preset, else --all-images.")
@click.option("--val-fraction", type=FloatRange(0, 1, min_open=True), default=None,
              help="Validation share (distillery.engine.split.is_val). Default: the smallest val_fraction of the "
                   "teachers' finetune.json, else 0.1.")
@click.option("--curation", type=click.IntRange(min=0), default=None, help="GT curation version (default latest; 0 none).")
@click.option("--runner", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: teachers run in this process; ray: a Ray Data pipeline.")
@click.option("--ray-address", default=None, help="Address of an existing Ray cluster (with --runner ray).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@fail_cleanly
def teachers_eval(presets, labelset, store, out, limit, val_only, val_fraction, curation, runner, ray_address, quiet):
    """Compare teachers on held-out human labels: box AP (COCOeval mAP50-95, mAP50), mask AP,
    mask mIoU and per-class AP, side by side with per-class deltas against the first teacher;
    classes that got worse are flagged.

    Each teacher labels the GT images over the GT's classes into a label set of STORE
    (named eval-..., reused on a rerun). Writes OUT/report.json, comparison.md,
    per_class_ap.png and one COCOeval report folder per teacher.

    \b
    Example:
      distillery teachers eval --teachers default --teachers finetuned/teachers.yaml \\
          --labelset coco128-gt --store store/ --out teacher-eval/
    """
    from distillery.engine.store import LabelStore
    from distillery.labeling.teacher_eval import Teacher, read_finetune, run_teacher_eval, teacher_label
    from distillery.labeling.teacher_eval_report import tables, write_outputs

    st = LabelStore(store)
    gt = st.open(labelset)
    teachers, seen = [], {}
    for p in presets:
        label = teacher_label(p)
        seen[label] = seen.get(label, 0) + 1
        ft, ft_path = read_finetune(p)
        teachers.append(Teacher(label if seen[label] == 1 else f"{label}#{seen[label]}", Path(p), ft, ft_path))
    ev = run_teacher_eval(st, gt, teachers, val_only=val_only, val_fraction=val_fraction, limit=limit,
                          curation=curation, runner=runner, ray_address=ray_address, progress=not quiet)
    r = ev.report
    click.echo(f"GT {gt.name or gt.id} (curation v{r['gt']['curation_version']}): {r['images']} images, "
               f"{r['split']['why']}")
    for t in r["teachers"]:
        named = f" ({t['labelset_name']})" if t["labelset_name"] else ""
        click.echo(f"teacher {t['label']}: {t['preset']} -> label set {t['labelset']}{named}, "
                   f"{t['labelled_now']} images labelled now")
    top, per = tables(ev)
    _echo_table(top)
    click.echo("")
    _echo_table(per, worse=lambda row: bool(row[-1]))
    worse = [row["class"] for row in ev.rows if row["worse"]]
    if len(teachers) > 1:
        click.echo(f"worse than {r['baseline']} in {len(worse)} of {len(ev.rows)} classes"
                   f"{': ' + ', '.join(worse) if worse else ''}")
    for w in ev.warnings:
        click.echo(click.style(f"warning: {w}", fg="yellow"))
    write_outputs(ev, out)
    click.echo(f"report: {str(out).rstrip('/')}/ (report.json, comparison.md, per_class_ap.png, one folder per teacher)")


def _echo_table(rows, worse=None) -> None:
    """Rows of strings, columns aligned (text left, numbers right); with ``worse``, the last
    column is text and rows for which ``worse(row)`` is true are red."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        last = len(row) - 1 if worse is not None else 0
        line = "  ".join(c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        click.echo(click.style(line, fg="red") if k and worse is not None and worse(row) else line)


@teachers.command("finetune")
@click.option("--teachers", "preset_path", required=True, type=Config("teachers"),
              help="Preset whose teachers to fine-tune (its detector and segmenter weights are the base models).")
@click.option("--store", required=True, type=Store())
@click.option("--labelset", default=None, metavar="NAME|ID",
              help="A curated label set, or ground truth from `labels import` (default: the store's only one).")
@click.option("--curation", type=click.IntRange(min=0), default=None,
              help="Curation version to apply (default: the latest; 0: none).")
@click.option("--component", type=click.Choice(["detector", "segmenter", "both"]), default="detector",
              show_default=True, help="detector: Grounding DINO; segmenter: the mask decoder of SAM, SAM 2 or "
                                      "SAM-HQ (its image and prompt encoders stay frozen); both: the detector, "
                                      "then the segmenter, into one OUT.")
@click.option("--method", type=click.Choice(["lora", "heads", "full"]), default="lora", show_default=True,
              help="Detector only (the segmenter always trains its mask decoder). lora: LoRA adapters on the encoder/decoder "
                   "linears; heads: the box heads only; full: all but the frozen Swin and BERT.")
@click.option("--out", required=True, type=Output(folder=True, example="ft/"),
              help="Folder for the weights, preset.yaml, finetune.json and checkpoints.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: detector 12, segmenter 10.")
@click.option("--lr", type=FloatRange(min=0, min_open=True, finite=True), default=None, help="Default: 1e-4 for both.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Detector: images per device and step (default 4); segmenter: box-mask pairs per step (default 8).")
@click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank (alpha = rank).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Share of images held out for validation, by image id.")
@click.option("--flip", type=FloatRange(0, 1), default=0.5, show_default=True,
              help="Probability of a left-right flip of a training image.")
@click.option("--max-classes", type=click.IntRange(min=1), default=80, show_default=True,
              help="Classes per training caption at most: the image's own plus sampled negatives.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Detector only. 0: train in this process on the preset's device; N: on N Ray Train workers "
                   "(a GPU each where the cluster has GPUs). The segmenter's decoder always trains in this process.")
@click.option("--ray-address", default=None, help="Ray cluster for --workers (default: start a local one).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT after its last checkpoint.")
@fail_cleanly
def teachers_finetune(preset_path, store, labelset, curation, component, method, out, epochs, lr, batch, rank, seed,
                      val_fraction, flip, max_classes, workers, ray_address, resume):
    """Fine-tune a teacher on reviewed labels; write its weights and a preset that uses them.

    The detector learns only from images a person reviewed exhaustively (a whole-image
    accept, every instance decided, or imported ground truth); accepted and relabelled
    instances are its targets, rejected ones background, ignored ones left out. The segmenter
    (SAM, SAM 2 or SAM-HQ: its mask decoder) learns the masks of confirmed instances (accepted,
    relabelled, or ground truth) in any image.
    Labelling with OUT/preset.yaml makes a new label set.

    \b
    Example:
      distillery teachers finetune --teachers teachers/teachers.yaml --store store/ --labelset coco128-gt \\
          --method lora --epochs 12 --out ft/
      distillery label imgs/ --ontology coco80 --teachers ft/preset.yaml --store store/ --name coco128-ft
    """
    from distillery.labeling.finetune.run import FinetuneConfig, finetune_detector
    from distillery.labeling.finetune.sam_run import SAM_DEFAULTS, SamFinetuneConfig, finetune_both, finetune_segmenter
    from distillery.labeling.teachers import PresetError

    cfg = FinetuneConfig(method=method, epochs=epochs or 12, lr=lr or 1e-4, batch=batch or 4, rank=rank, seed=seed,
                         val_fraction=val_fraction, flip=flip, max_classes=max_classes, curation=curation,
                         workers=workers)
    sam_cfg = SamFinetuneConfig(epochs=epochs or SAM_DEFAULTS["epochs"], lr=lr or SAM_DEFAULTS["lr"],
                                batch=batch or SAM_DEFAULTS["batch"], seed=seed, val_fraction=val_fraction,
                                curation=curation)
    if component == "segmenter" and workers:
        raise UserError("--workers applies to the detector: the segmenter's mask decoder (SAM: 4M parameters, on "
                        "image embeddings computed once and cached) trains in this process on the preset's device; "
                        "drop --workers")
    ctx = click.get_current_context()
    given = [f"--{n.replace('_', '-')}" for n in ("method", "rank", "max_classes", "flip")
             if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]
    if component == "segmenter" and given:
        raise UserError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the detector; --component "
                        "segmenter trains the segmenter's mask decoder (SAM, SAM 2, SAM-HQ)")
    from distillery.labeling.finetune.run import FINETUNE_DETECTORS
    from distillery.labeling.finetune.sam_kinds import FINETUNE_SEGMENTERS, KIND_NAMES
    from distillery.labeling.teachers import TeacherPreset

    try:
        p = TeacherPreset.load(preset_path)
        if p.teacher is None:  # what is loaded is checked before any run folder exists (no weights read)
            if component != "segmenter" and p.detector.kind in FINETUNE_DETECTORS:
                p.detector_text(preset_path)
            if component != "detector":
                p.check_segmenter(preset_path)
        if not ray_address:
            p.check_device_here(preset_path)
    except PresetError as e:
        raise UserError(str(e)) from e
    if p.teacher is not None:
        raise UserError(f"{preset_path}: fine-tuning is not supported for teacher.kind {p.teacher.kind} (a grounded "
                        "segmenter; see the README's Teacher kinds); fine-tune a detector + segmenter preset instead")
    if component != "segmenter" and p.detector.kind not in FINETUNE_DETECTORS:
        raise UserError(f"{preset_path}: fine-tuning covers detector kinds {', '.join(FINETUNE_DETECTORS)}, not "
                        f"{p.detector.kind}")
    if component != "detector" and p.segmenter.kind not in FINETUNE_SEGMENTERS:
        raise UserError(f"{preset_path}: fine-tuning covers segmenter kinds {', '.join(FINETUNE_SEGMENTERS)}, not "
                        f"{p.segmenter.kind}")
    try:
        if component == "detector":
            rec = finetune_detector(preset_path, store, labelset, out, cfg, resume=resume, ray_address=ray_address,
                                    log=click.echo)
        elif component == "segmenter":
            rec = finetune_segmenter(preset_path, store, labelset, out, sam_cfg, resume=resume, log=click.echo)
        else:
            rec = finetune_both(preset_path, store, labelset, out, cfg, sam_cfg, resume=resume,
                                ray_address=ray_address, log=click.echo)
    except PresetError as e:
        raise UserError(str(e)) from e
    if component in ("segmenter", "both"):
        sam = rec if component == "segmenter" else rec["segmenter"]
        v = sam["epochs"][-1]["val_miou"]
        click.echo(f"{KIND_NAMES[sam['kind']]} done: {len(sam['epochs'])} epochs, last train loss "
                   f"{sam['epochs'][-1]['train_loss']:.4f}, val mIoU {'-' if v is None else format(v, '.4f')}; wrote "
                   f"{Path(out) / sam['weights']['path']} (weights sha256 {sam['weights_sha256'][:16]})")
    if component == "both":
        rec = rec["detector"]
    if component != "segmenter":
        _echo_detector_done(rec, out)
    click.echo(f"wrote {Path(out) / 'preset.yaml'}, {Path(out) / 'finetune.json'}")
    click.echo(f"label with it: distillery label SOURCE... --teachers {Path(out) / 'preset.yaml'} --store STORE")


def _echo_detector_done(rec: dict, out) -> None:
    last = rec["epochs"][-1]
    p = rec["parameters"] or {}
    w = rec["weights"]
    click.echo(f"done: {len(rec['epochs'])} epochs, last train loss {last['train_loss']:.4f}, val AP50 "
               f"{'-' if last['val_ap50'] is None else format(last['val_ap50'], '.4f')}; trained "
               f"{p.get('trainable', 0):,} of {p.get('total', 0):,} parameters ({100 * p.get('fraction', 0):.2f}%)")
    sha = f", sha256 {w['adapter_sha256'][:16]}" if w.get("adapter_sha256") else ""
    click.echo(f"wrote {Path(out) / w['path']} ({w['bytes']:,} bytes{sha})")
