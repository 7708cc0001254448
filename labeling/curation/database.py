"""Which FiftyOne database the curate commands use, and the persistent datasets in it.

One dataset holds one label set (``info["distillery"]["labelset"]``); its instances live in
the field :data:`FIELD`. FiftyOne is imported only through :func:`load_fiftyone`, which first
checks that the database it reaches is the one the settings ask for (:func:`check_database`).
"""

from __future__ import annotations

import functools
import os

from distillery.engine.store import LabelSet

os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")  # an offline tool: no usage analytics

#: The sample field that holds a label record's instances (``fo.Detections``).
FIELD = "pseudo"


class CurationError(ValueError):
    """A dataset, its decisions or a request about them is inconsistent; the message says how to fix it."""


def load_fiftyone():
    """The ``fiftyone`` module, after :func:`check_database` for the current settings
    (env ``FIFTYONE_DATABASE_DIR`` / ``FIFTYONE_DATABASE_URI``, as the curate commands set
    them). The check runs once per distinct pair of settings in a process.

    Raises:
        CurationError: see :func:`check_database`.
    """
    return _checked_fiftyone(os.environ.get("FIFTYONE_DATABASE_DIR") or None,
                             os.environ.get("FIFTYONE_DATABASE_URI") or None)


@functools.cache  # keyed by the settings: a check that raised is not cached and runs again
def _checked_fiftyone(database_dir: str | None, database_uri: str | None):
    import fiftyone

    check_database(database_dir, database_uri)
    return fiftyone


def check_database(database_dir: str | None, database_uri: str | None) -> None:
    """Refuse a FiftyOne connection other than the one asked for.

    Args:
        database_dir: folder whose MongoDB should hold the datasets (``FIFTYONE_DATABASE_DIR``),
            or None for no requirement.
        database_uri: MongoDB URI to use (``FIFTYONE_DATABASE_URI``), or None. When given it
            decides and ``database_dir`` is not checked.

    Raises:
        CurationError: ``database_uri`` differs from the URI FiftyOne was configured with
            when it was imported in this process; or ``database_dir`` names one folder but
            FiftyOne is connected to a MongoDB that keeps its files elsewhere. FiftyOne
            attaches to a database service that another FiftyOne process already runs,
            whatever folder that one uses (``fiftyone.core.service.DatabaseService``); writing
            there silently would mix datasets.
    """
    import fiftyone

    if database_uri:
        got = fiftyone.config.database_uri
        if got != database_uri:
            raise CurationError(
                f"FiftyOne in this process is connected to {got or 'its own database service'}, not the requested "
                f"--database-uri {database_uri}: FiftyOne reads FIFTYONE_DATABASE_URI once, when it is first imported. "
                "Run the command in a new process."
            )
        return
    if not database_dir:
        return
    from fiftyone.core.odm.database import get_db_client

    try:
        opts = get_db_client().admin.command("getCmdLineOpts")
        got = opts.get("parsed", {}).get("storage", {}).get("dbPath")
    except Exception:  # noqa: BLE001 - a MongoDB that will not say where it is: nothing to compare
        return
    if got and os.path.realpath(got) != os.path.realpath(os.path.expanduser(database_dir)):
        raise CurationError(
            f"FiftyOne is connected to a MongoDB that keeps its files in {got}, not in the requested "
            f"database dir {database_dir}: another FiftyOne process on this machine already runs a database service, "
            "and FiftyOne attaches to it. Stop that process, or run a MongoDB of your own and pass --database-uri "
            "(FIFTYONE_DATABASE_URI)."
        )


def bound_labelset(name: str) -> str | None:
    """Id of the label set that dataset ``name`` was synced from; None if there is no such dataset."""
    fo = load_fiftyone()
    if not fo.dataset_exists(name):
        return None
    return (fo.load_dataset(name).info or {}).get("distillery", {}).get("labelset")


def open_dataset(name: str, labelset: LabelSet | None = None, create: bool = False):
    """The persistent dataset ``name``; created (bound to ``labelset``) when ``create``.

    Raises:
        CurationError: the dataset does not exist (and not ``create``), or it holds another label set.
    """
    fo = load_fiftyone()
    if fo.dataset_exists(name):
        ds = fo.load_dataset(name)
        bound = (ds.info or {}).get("distillery", {}).get("labelset")
        if bound is None:
            raise CurationError(f"FiftyOne dataset {name!r} was not made by `distillery curate sync`; choose another --dataset")
        if labelset is not None and bound != labelset.id:
            raise CurationError(
                f"FiftyOne dataset {name!r} holds label set {bound}, not {labelset.id}; sync into another --dataset "
                f"or delete it (`fiftyone datasets delete {name}`)"
            )
        declare_schema(ds)  # a dataset made before a field was added
        return ds
    if not create:
        raise CurationError(f"no FiftyOne dataset {name!r}; create it with `distillery curate sync --dataset {name}`")
    ds = fo.Dataset(name, persistent=True)
    declare_schema(ds)
    ds.info = {"distillery": {"labelset": labelset.id, "store": str(labelset.root.parent.parent.resolve()),
                              "classes": labelset.classes}}
    ds.save()
    return ds


#: Sample fields of a curation dataset besides FiftyOne's own: ``(name, field class)``.
SAMPLE_FIELDS = (("image_id", "StringField"), ("store_row", "StringField"), ("error", "StringField"),
                 ("num_instances", "IntField"), ("phash", "StringField"), ("dup_group", "IntField"))

#: Attributes of each ``fo.Detection`` in :data:`FIELD` (see
#: :func:`distillery.labeling.curation.samples.record_to_sample`): ``(name, field class)``,
#: ``"List:X"`` for a list of X.
DETECTION_ATTRIBUTES = (
    ("instance_uid", "StringField"), ("teacher_label", "StringField"), ("top2_label", "StringField"),
    ("soft_scores", "List:FloatField"), ("mask_score", "FloatField"), ("margin", "FloatField"),
    ("mask_box_iou", "FloatField"), ("mask_outside", "FloatField"), ("area", "FloatField"),
    ("overlap_iou", "FloatField"), ("band", "StringField"), ("priority", "FloatField"),
    ("review_reason", "StringField"), ("iscrowd", "BooleanField"), ("rule_decision", "StringField"),
)


def declare_schema(ds) -> None:
    """Declare every field a curation sample holds on ``ds`` (those missing only), as
    FiftyOne's ``add_samples(..., dynamic=True)`` would infer them from the samples: the
    fields of :data:`SAMPLE_FIELDS`, :data:`FIELD` as ``fo.Detections`` and its
    :data:`DETECTION_ATTRIBUTES`. With the schema declared up front, samples are added with
    ``expand_schema=False`` (FiftyOne then skips inferring it from every sample), and an
    attribute that is None on every sample so far (``rule_decision``) is still filterable.
    :data:`FIELD` and its attributes go in one ``add_sample_field`` call (each call reloads
    the dataset: 21 calls took 1.35 s here, one 0.05 s)."""
    from fiftyone.core.odm.utils import create_field

    fo = load_fiftyone()

    def kind(ftype):  # (field class, list element class or None)
        if ftype.startswith("List:"):
            return fo.ListField, getattr(fo, ftype[len("List:"):])
        return getattr(fo, ftype), None

    have = ds.get_field_schema(flat=True)
    for name, ftype in SAMPLE_FIELDS:
        if name not in have:
            ds.add_sample_field(name, getattr(fo, ftype))
    if FIELD not in have:
        attrs = []
        for name, ftype in DETECTION_ATTRIBUTES:
            ftype, sub = kind(ftype)
            attrs.append(create_field(name, ftype, subfield=sub))
        dets = create_field("detections", fo.ListField, subfield=fo.EmbeddedDocumentField(fo.Detection, fields=attrs))
        ds.add_sample_field(FIELD, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections, fields=[dets])
        return
    for name, ftype in DETECTION_ATTRIBUTES:  # a dataset synced before an attribute existed
        path = f"{FIELD}.detections.{name}"
        if path not in have:
            ftype, sub = kind(ftype)
            ds.add_sample_field(path, ftype, subfield=sub)
