"""The saved review views of a curation dataset."""

from __future__ import annotations

from distillery.engine.store import DECISIONS
from distillery.labeling.curation.config import CurationConfig
from distillery.labeling.curation.database import FIELD


def save_views(ds, cfg: CurationConfig) -> list[str]:
    """Create or update the review saved views on ``ds`` with ``cfg``'s thresholds; returns
    their names.

    A FiftyOne saved view stores its stages (filters on fields), not sample ids, so adding
    samples never calls for re-saving one: a view is written only when it is missing or its
    stored stages differ from the definition below (other thresholds, or edited in the App).

    ``review-queue``: undecided instances, images by their highest priority, highest first.
    ``band-confident`` / ``band-uncertain`` / ``band-below``: instances per score band (per-class
    thresholds). ``ambiguous-class``, ``mask-box-disagree``, ``tiny``, ``image-filling``,
    ``same-class-overlap``: instances past the matching threshold. ``near-duplicates``:
    images with a pHash neighbour, grouped. ``many-instances``, ``zero-instances``,
    ``errors``: images. ``conflicting-decisions``: instances with two decision tags.
    """
    from fiftyone import ViewField as F

    det = F(f"{FIELD}.detections")
    undecided = ~F("tags").contains(list(DECISIONS))
    views = {
        "review-queue": ds.filter_labels(FIELD, undecided).sort_by(
            F(f"{FIELD}.detections").map(F("priority")).max(), reverse=True),
        "band-confident": ds.filter_labels(FIELD, F("band") == "confident"),
        "band-uncertain": ds.filter_labels(FIELD, F("band") == "uncertain"),
        "band-below": ds.filter_labels(FIELD, F("band") == "below"),
        "ambiguous-class": ds.filter_labels(FIELD, F("margin") < cfg.ambiguity_margin).sort_by(
            det.map(F("margin")).min()),
        "mask-box-disagree": ds.filter_labels(FIELD, F("mask_box_iou") < cfg.mask_box_iou),
        "tiny": ds.filter_labels(FIELD, F("area") < cfg.min_area),
        "image-filling": ds.filter_labels(FIELD, F("area") > cfg.max_area),
        "same-class-overlap": ds.filter_labels(FIELD, F("overlap_iou") > cfg.overlap_iou),
        "near-duplicates": ds.match(F("dup_group") != None).sort_by("dup_group"),  # noqa: E711
        "many-instances": ds.match(F("num_instances") > cfg.many_instances).sort_by("num_instances", reverse=True),
        "zero-instances": ds.match((F("num_instances") == 0) & (F("error") == None)),  # noqa: E711
        "errors": ds.match(F("error") != None),  # noqa: E711
        "conflicting-decisions": ds.filter_labels(
            FIELD, F("tags").filter(F().is_in(list(DECISIONS))).unique().length() > 1),
    }
    saved = set(ds.list_saved_views())
    for name, view in views.items():
        if name not in saved or ds.load_saved_view(name) != view:  # `==` compares stages, FiftyOne's own test
            ds.save_view(name, view, overwrite=True)
    return list(views)
