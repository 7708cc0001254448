"""Curation settings: the thresholds that define review signals and score bands, and the
rules that turn signals into decisions. One YAML file (``curation.yaml``) holds both:

.. code-block:: yaml

    score_bands:                 # on box_score; per class, "default" for the rest
      default: {confident: 0.5, below: 0.25}
      person:  {confident: 0.6, below: 0.3}
    ambiguity_margin: 0.1        # top-1 minus top-2 soft score under this: ambiguous class
    mask_box_iou: 0.7            # IoU of the mask's own bbox with the box under this: disagree
    min_area: 0.0005             # mask area / image area under this: tiny
    max_area: 0.9                # over this: image-filling
    overlap_iou: 0.7             # IoU with a same-class box over this: heavy overlap
    many_instances: 30           # images with more instances than this: crowded
    near_duplicate_bits: 6       # pHash Hamming distance (of 64 bits) at or under this
    rules:                       # signal -> decision, applied by `curate rules`
      below: reject
      uncertain: ignore
      confident: accept
      tiny: reject
      image_filling: ignore
      ambiguous: ignore
      mask_box_disagree: ignore
      overlap: null              # null: this signal decides nothing

Every key is optional (defaults above). When several rules fire on one instance the most
severe decision wins: ``reject`` > ``ignore`` > ``accept``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from distillery.engine.config import ConfigError, load_yaml
from distillery.engine.schema import StrictConfig, validate_config
from distillery.engine.store import DECISIONS

#: Signals a rule can name (keys of ``rules``).
RULE_SIGNALS = ("below", "uncertain", "confident", "tiny", "image_filling", "ambiguous", "mask_box_disagree", "overlap")
#: Decision severity: the most severe decision of all fired rules wins.
SEVERITY = {"accept": 0, "ignore": 1, "reject": 2}

DEFAULT_RULES = {
    "below": "reject",
    "uncertain": "ignore",
    "confident": "accept",
    "tiny": "reject",
    "image_filling": "ignore",
    "ambiguous": "ignore",
    "mask_box_disagree": "ignore",
    "overlap": None,
}

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class Band(StrictConfig):
    """Score band thresholds on ``box_score`` (in [0, 1]): ``>= confident`` confident,
    ``< below`` below threshold, between them uncertain.

    Raises:
        pydantic.ValidationError: a threshold outside [0, 1], or ``below > confident``.
    """

    model_config = ConfigDict(frozen=True)

    confident: Fraction = 0.5
    below: Fraction = 0.25

    @model_validator(mode="after")
    def _ordered(self) -> "Band":
        if self.below > self.confident:
            raise ValueError(f"below ({self.below}) must not exceed confident ({self.confident})")
        return self

    def of(self, score: float) -> str:
        """``"confident"``, ``"uncertain"`` or ``"below"`` for a ``box_score``."""
        return "confident" if score >= self.confident else ("below" if score < self.below else "uncertain")


class CurationConfig(StrictConfig):
    """Thresholds and rules; see the module docstring for meanings and units.

    ``score_bands`` always holds ``"default"``; a class band leaves out a threshold to take
    the default band's. ``rules`` always holds every signal of :data:`RULE_SIGNALS` (those a
    file leaves out keep :data:`DEFAULT_RULES`).
    """

    model_config = ConfigDict(frozen=True)

    score_bands: dict[str, Band] = Field(default_factory=lambda: {"default": Band()})
    ambiguity_margin: Fraction = 0.1
    mask_box_iou: Fraction = 0.7
    min_area: Fraction = 0.0005
    max_area: Fraction = 0.9
    overlap_iou: Fraction = 0.7
    many_instances: Annotated[int, Field(ge=0, le=10**9)] = 30
    near_duplicate_bits: Annotated[int, Field(ge=0, le=64)] = 6
    rules: dict[Literal[RULE_SIGNALS], Literal[DECISIONS] | None] = Field(default_factory=lambda: dict(DEFAULT_RULES))

    @field_validator("score_bands", mode="before")
    @classmethod
    def _inherit_default_band(cls, v):
        """Fill thresholds a class band leaves out from the file's ``default`` band (or
        :class:`Band`'s defaults); an invalid default is reported at ``score_bands.default``."""
        if v is None:
            v = {}
        if not isinstance(v, dict):
            return v
        base = Band()
        if isinstance(v.get("default"), dict):
            try:
                base = Band.model_validate(v["default"])
            except ValidationError:
                pass  # reported once, where it is written
        out = {"default": base}
        for name, band in v.items():
            out[name] = {**base.model_dump(), **band} if isinstance(band, dict) and name != "default" else band
        return out

    @field_validator("rules", mode="before")
    @classmethod
    def _default_rules(cls, v):
        """A file's rules override :data:`DEFAULT_RULES` signal by signal."""
        if v is None:
            return dict(DEFAULT_RULES)
        return {**DEFAULT_RULES, **v} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _area_order(self) -> "CurationConfig":
        if self.min_area > self.max_area:
            raise ValueError(f"min_area ({self.min_area}) must not exceed max_area ({self.max_area})")
        return self

    def band(self, label: str) -> Band:
        """The score band of class ``label`` (the ``default`` band if it has none)."""
        return self.score_bands.get(label, self.score_bands["default"])

    def check_classes(self, classes: list[str], source: str = "curation config") -> None:
        """Raises :class:`ConfigError` if ``score_bands`` names a class not in ``classes``."""
        unknown = sorted(set(self.score_bands) - {"default"} - set(classes))
        if unknown:
            raise ConfigError(
                f"{source}: score_bands names class(es) {unknown} that the label set's ontology does not have "
                f"(it has {len(classes)}: {', '.join(classes[:20])}{'...' if len(classes) > 20 else ''})"
            )

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "curation config") -> "CurationConfig":
        """Validate a parsed YAML mapping (``None``: all defaults).

        Raises:
            ConfigError: one line per bad key, ``"{source}: {key.path}: {problem}"`` with the
                allowed values or range (unknown keys list the known ones).
        """
        return validate_config(cls, {} if d is None else d, source, ConfigError)

    @classmethod
    def load(cls, path: str | Path | None) -> "CurationConfig":
        """From a YAML file (see module docstring); ``None``: all defaults.

        Raises:
            ConfigError: missing file, invalid YAML, a key given twice, or as :meth:`from_dict`.
        """
        if path is None:
            return cls()
        return cls.from_dict(load_yaml(path, "curation rules"), source=str(path))

    def to_dict(self) -> dict:
        """Plain nested dict in the YAML's layout (every key, bands as ``{confident, below}``)."""
        return self.model_dump()
