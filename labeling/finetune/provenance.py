"""What a fine-tuning run leaves beside its weights: ``OUT/preset.yaml`` (the input preset
pointing at the new weights) and ``OUT/finetune.json`` (provenance), for the detector
(:mod:`.run`), SAM (:mod:`.sam_run`) or both in one ``OUT``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from distillery.labeling.finetune.data import FinetuneData


def training_data(data: FinetuneData, identity: dict) -> dict:
    """The training data's part of a ``finetune.json`` section: the hash of its instances
    (:meth:`FinetuneData.instance_ids_sha256`), images per split, counts by reason and role."""
    return {"instance_ids_sha256": identity["training_data_sha256"], "train_images": len(data.train),
            "val_images": len(data.val), "counts": dict(data.counts)}


def write_provenance(out: Path, preset, data: FinetuneData, parts: dict[str, tuple[dict, dict]], what: str) -> dict:
    """``OUT/preset.yaml`` (the input preset with each component's keys replaced) and
    ``OUT/finetune.json`` (module docstring), written after the last epoch of every component.

    Args:
        parts: component (``detector``, ``segmenter``) -> (its provenance section, its preset keys;
            paths relative to ``out``, which holds the new preset).
        what: the training method(s), for the preset's header comment.

    Returns:
        the record written to ``finetune.json``: with one component its section's keys at the top
        level and ``component`` its name; with both, ``component: both`` and one section per component.
        Either way ``labelset``, ``curation_version``, ``preset``, ``created`` and
        ``hyperparameters.val_fraction`` are at the top level (``teachers eval`` reads them).
    """
    from distillery.labeling.teachers import TeacherPreset

    d = preset.to_dict()
    for component, (_, keys) in parts.items():
        d[component].update(keys)
    path = out / "preset.yaml"
    header = (f"# Written by `distillery teachers finetune` ({what}) from label set {data.labelset}; "
              "see finetune.json beside it.\n")
    path.write_text(header + yaml.safe_dump(d, sort_keys=False))
    TeacherPreset.load(path)  # the preset must load as written
    shared = {"preset": "preset.yaml", "labelset": {"id": data.labelset, "name": data.labelset_name, "kind": data.kind},
              "curation_version": data.curation_version}
    if len(parts) == 1:
        ((component, (section, _)),) = parts.items()
        record = {"component": component, **section, **shared}
    else:
        record = {"component": "both", **shared, "hyperparameters": {"val_fraction": data.val_fraction},
                  **{component: section for component, (section, _) in parts.items()}}
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = out / ".finetune.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / "finetune.json")
    return record
