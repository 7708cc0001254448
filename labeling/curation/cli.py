"""``distillery curate ...``: thin commands over :mod:`distillery.labeling.curation` (FiftyOne is imported
only when a command runs)."""

from __future__ import annotations

import os

import click

from distillery.engine.cli_errors import fail_cleanly
from distillery.engine.cli_types import Config, Output, Store


_errors = fail_cleanly


def _use_database(ctx, param, value):
    """Option callback: put --database-dir / --database-uri where FiftyOne reads them (its env
    vars, read when FiftyOne is first imported). Callbacks of a subcommand run after the
    group's, so a value given after the subcommand wins."""
    if value:
        if param.name == "database_dir":
            os.environ["FIFTYONE_DATABASE_DIR"] = os.path.abspath(os.path.expanduser(value))
        else:
            os.environ["FIFTYONE_DATABASE_URI"] = value
    return value


def database_options(fn):
    """--database-dir and --database-uri, accepted on the ``curate`` group and on every subcommand."""
    fn = click.option("--database-uri", envvar="FIFTYONE_DATABASE_URI", default=None, expose_value=False,
                      callback=_use_database,
                      help="Use an existing MongoDB instead of FiftyOne's own (env FIFTYONE_DATABASE_URI).")(fn)
    return click.option("--database-dir", envvar="FIFTYONE_DATABASE_DIR",
                        type=Output(folder=True, example="~/.fiftyone/var/lib/mongo"),
                        default=None, expose_value=False, callback=_use_database,
                        help="Where FiftyOne's MongoDB keeps its files (env FIFTYONE_DATABASE_DIR; FiftyOne's "
                             "default: ~/.fiftyone/var/lib/mongo).")(fn)


@click.group()
@database_options
def curate() -> None:
    """Curate pseudo-labels in FiftyOne; decisions go back to the store as a versioned layer.

    \b
    distillery curate sync   --store store/ --dataset coco128
    distillery curate app    --dataset coco128            # http://127.0.0.1:5151
    distillery curate rules  --dataset coco128 --rules default
    distillery curate commit --dataset coco128 --store store/
    distillery curate report --store store/ --out report/

    --database-dir / --database-uri go before or after the subcommand; after it, they win.
    """


@curate.command("sync")
@database_options
@click.option("--store", required=True, type=Store(), help="Label store directory.")
@click.option("--labelset", default=None, metavar="NAME|ID",
              help="Label set name, id or unique id prefix (default: the dataset's, else the store's only one).")
@click.option("--dataset", "name", required=True, help="FiftyOne dataset name (created if new, persistent).")
@click.option("--rules", "rules_path", default=None, type=Config("rules"),
              help="Curation rules: a YAML file or a shipped name (default). Thresholds for score bands and review signals (default thresholds otherwise).")
@click.option("--no-phash", is_flag=True, help="Skip perceptual hashes (no near-duplicate view; no image decoding).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_errors
def curate_sync(store, labelset, name, rules_path, no_phash, quiet):
    """Store -> FiftyOne dataset, incrementally: adds new images, replaces changed ones,
    restores committed decisions.

    Example: distillery curate sync --store store/ --dataset coco128
    """
    from distillery.engine.store import LabelStore
    from distillery.labeling.curation.config import CurationConfig
    from distillery.labeling.curation.database import bound_labelset
    from distillery.labeling.curation.sync import sync

    cfg = CurationConfig.load(rules_path)  # before the database is touched
    # an existing dataset already names its label set
    ls = LabelStore(store).open(labelset or bound_labelset(name))
    s = sync(ls, name, cfg, with_phash=not no_phash, progress=not quiet)
    click.echo(
        f"dataset {s.dataset} <- label set {s.labelset}: {s.added} added, {s.updated} updated, {s.unchanged} unchanged "
        f"images (written: {s.instances} instances, {s.errors} error images, {s.restored_decisions} decisions "
        f"restored) in {s.seconds:.1f} s"
    )
    if s.rebanded:
        click.echo(f"new score-band thresholds: {s.rebanded} instances changed band")
    if not no_phash:
        click.echo(f"near-duplicate images: {s.near_duplicate_images}")
    click.echo(f"saved views: {', '.join(s.views)}")


@curate.command("app")
@database_options
@click.option("--dataset", "name", required=True, help="FiftyOne dataset made by `curate sync`.")
@click.option("--port", type=click.IntRange(1, 65535), default=5151, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; pass 0.0.0.0 explicitly to serve other machines (no authentication).")
@click.option("--view", "view_name", default=None, help="Open this saved view (e.g. review-queue).")
@_errors
def curate_app(name, port, host, view_name):
    """Serve the FiftyOne App for visual QA until interrupted (Ctrl-C).

    Example: distillery curate app --dataset coco128 --view review-queue
    """
    from distillery.labeling.curation.database import CurationError, load_fiftyone, open_dataset

    fo = load_fiftyone()
    ds = open_dataset(name)
    view = None
    if view_name:
        if view_name not in ds.list_saved_views():
            raise CurationError(f"dataset {name!r} has no saved view {view_name!r}; it has: {', '.join(ds.list_saved_views())}")
        view = ds.load_saved_view(view_name)
    import socket

    with socket.socket() as sock:  # FiftyOne would retry forever on a busy port, or join another App
        try:
            sock.bind((host, port))
        except OSError as e:
            raise CurationError(f"cannot serve on {host}:{port} ({e.strerror}); another program (or App) uses it: "
                                "choose another --port") from e
    session = fo.launch_app(ds, view=view, port=port, address=host, remote=True, auto=False)
    click.echo(f"FiftyOne App for {name!r}: http://{host}:{port}/  (saved views: {', '.join(ds.list_saved_views())})")
    click.echo("Ctrl-C to stop.")
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        pass


@curate.command("rules")
@database_options
@click.option("--dataset", "name", required=True)
@click.option("--rules", "rules_path", required=True, type=Config("rules"),
              help="Curation rules: a YAML file or a shipped name (default; `distillery configs show default --kind rules`).")
@click.option("--overwrite-manual", is_flag=True, help="Also replace decisions people set in the App.")
@_errors
def curate_rules(name, rules_path, overwrite_manual):
    """Apply rule-based decisions (accept / reject / ignore) to every instance.

    Example: distillery curate rules --dataset coco128 --rules default
    """
    from distillery.labeling.curation.config import CurationConfig
    from distillery.labeling.curation.database import open_dataset
    from distillery.labeling.curation.rules import apply_rules

    cfg = CurationConfig.load(rules_path)  # before the database is touched
    ds = open_dataset(name)
    counts = apply_rules(ds, cfg, overwrite_manual)
    click.echo(
        "rules set: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("accept", "reject", "ignore", "none"))
        + f"; manual decisions kept: {counts.get('manual_kept', 0)}"
    )
    fired = sorted(((k[6:], v) for k, v in counts.items() if k.startswith("fired:")), key=lambda kv: -kv[1])
    click.echo("signals that held (an instance may hold several): " + ", ".join(f"{k} {v}" for k, v in fired))


@curate.command("commit")
@database_options
@click.option("--dataset", "name", required=True)
@click.option("--store", required=True, type=Store())
@_errors
def curate_commit(name, store):
    """Write the dataset's decisions to the store as a new curation version.

    Example: distillery curate commit --dataset coco128 --store store/
    """
    from distillery.engine.store import LabelStore
    from distillery.labeling.curation.database import CurationError, open_dataset
    from distillery.labeling.curation.decisions import commit

    ds = open_dataset(name)
    synced_from = ds.info["distillery"].get("store")
    if synced_from and os.path.realpath(store) != os.path.realpath(synced_from):
        # label-set ids are fingerprints of what made the labels: another store can hold the same id
        raise CurationError(f"dataset {name!r} was synced from the store {synced_from}, not {store}; commit to "
                            "that store (or sync this one into another dataset first)")
    ls = LabelStore(store).open(ds.info["distillery"]["labelset"])
    version, written, table = commit(ds, ls)
    n = table.num_rows
    if written:
        click.echo(f"label set {ls.id}: curation version {version} written ({n} decisions)")
    else:
        click.echo(f"label set {ls.id}: decisions unchanged since curation version {version}; nothing written")


@curate.command("report")
@database_options
@click.option("--store", required=True, type=Store())
@click.option("--labelset", default=None, metavar="NAME|ID",
              help="Label set name, id or unique id prefix (default: the store's only one).")
@click.option("--out", required=True, type=Output(folder=True, example="report/"),
              help="Directory for the PNGs and report.json.")
@click.option("--rules", "rules_path", default=None, type=Config("rules"),
              help="Curation rules (a YAML file or a shipped name) whose score bands are drawn (default thresholds otherwise).")
@_errors
def curate_report(store, labelset, out, rules_path):
    """Per-class counts, score histograms and decision totals as PNGs plus report.json.

    Example: distillery curate report --store store/ --out report/
    """
    from distillery.engine.store import LabelStore
    from distillery.labeling.curation.config import CurationConfig
    from distillery.labeling.curation.report import write_report

    ls = LabelStore(store).open(labelset)
    cfg = CurationConfig.load(rules_path)
    cfg.check_classes(ls.classes, str(rules_path))
    nums = write_report(ls, out, cfg)
    d = nums["decisions"]
    click.echo(f"report for {ls.id} (curation v{nums['curation_version']}) in {out}: counts.png, scores.png, "
               f"decisions.png, report.json")
    click.echo("instances: " + ", ".join(f"{k} {d[k]}" for k in ("accept", "reject", "ignore", "undecided", "relabeled")))
