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

from dataclasses import dataclass, field
from pathlib import Path

from distillery.engine.config import ConfigError, load_yaml
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


@dataclass(frozen=True)
class Band:
    """Score band thresholds on ``box_score``: ``>= confident`` confident, ``< below`` below
    threshold, between them uncertain."""

    confident: float = 0.5
    below: float = 0.25

    def of(self, score: float) -> str:
        return "confident" if score >= self.confident else ("below" if score < self.below else "uncertain")


@dataclass(frozen=True)
class CurationConfig:
    """Thresholds and rules; see the module docstring for meanings and units."""

    score_bands: dict = field(default_factory=lambda: {"default": Band()})
    ambiguity_margin: float = 0.1
    mask_box_iou: float = 0.7
    min_area: float = 0.0005
    max_area: float = 0.9
    overlap_iou: float = 0.7
    many_instances: int = 30
    near_duplicate_bits: int = 6
    rules: dict = field(default_factory=lambda: dict(DEFAULT_RULES))

    def band(self, label: str) -> Band:
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
        """Validate a parsed YAML mapping; raises :class:`ConfigError` naming ``source`` and the key."""
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(known)}")

        def frac(key: str, lo: float = 0.0, hi: float = 1.0) -> float:
            v = d.get(key, cls.__dataclass_fields__[key].default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                hint = " (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)" if isinstance(v, str) else ""
                raise ConfigError(f"{source}: {key} must be a number in [{lo}, {hi}], got {v!r}{hint}")
            return float(v)

        bands = {"default": Band()}
        raw_bands = d.get("score_bands", {}) or {}
        if not isinstance(raw_bands, dict):
            raise ConfigError(f"{source}: score_bands must map class name to {{confident, below}}")
        for name, b in raw_bands.items():
            if not isinstance(b, dict) or set(b) - {"confident", "below"}:
                raise ConfigError(f"{source}: score_bands.{name} must be a mapping with keys confident and below")
            base = bands["default"] if name != "default" else Band()
            conf, below = b.get("confident", base.confident), b.get("below", base.below)
            for k, v in (("confident", conf), ("below", below)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                    raise ConfigError(f"{source}: score_bands.{name}.{k} must be a number in [0, 1], got {v!r}")
            if below > conf:
                raise ConfigError(f"{source}: score_bands.{name}: below ({below}) must not exceed confident ({conf})")
            bands[str(name)] = Band(float(conf), float(below))

        rules = dict(DEFAULT_RULES)
        raw_rules = d.get("rules", {}) or {}
        if not isinstance(raw_rules, dict):
            raise ConfigError(f"{source}: rules must map a signal to a decision")
        for k, v in raw_rules.items():
            if k not in RULE_SIGNALS:
                raise ConfigError(f"{source}: rules.{k}: unknown signal; known: {list(RULE_SIGNALS)}")
            if v is not None and v not in DECISIONS:
                raise ConfigError(f"{source}: rules.{k}: decision must be one of {list(DECISIONS)} or null, got {v!r}")
            rules[k] = v

        ints = {}
        for key in ("many_instances", "near_duplicate_bits"):
            v = d.get(key, cls.__dataclass_fields__[key].default)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= (64 if key == "near_duplicate_bits" else 10**9):
                raise ConfigError(f"{source}: {key} must be a non-negative integer{' <= 64' if key == 'near_duplicate_bits' else ''}, got {v!r}")
            ints[key] = v
        cfg = cls(
            score_bands=bands,
            ambiguity_margin=frac("ambiguity_margin"),
            mask_box_iou=frac("mask_box_iou"),
            min_area=frac("min_area"),
            max_area=frac("max_area"),
            overlap_iou=frac("overlap_iou"),
            rules=rules,
            **ints,
        )
        if cfg.min_area > cfg.max_area:
            raise ConfigError(f"{source}: min_area ({cfg.min_area}) must not exceed max_area ({cfg.max_area})")
        return cfg

    @classmethod
    def load(cls, path: str | Path | None) -> "CurationConfig":
        """From a YAML file (see module docstring); ``None``: all defaults."""
        if path is None:
            return cls()
        return cls.from_dict(load_yaml(path, "curation rules"), source=str(path))

    def to_dict(self) -> dict:
        return {
            "score_bands": {k: {"confident": b.confident, "below": b.below} for k, b in self.score_bands.items()},
            "ambiguity_margin": self.ambiguity_margin,
            "mask_box_iou": self.mask_box_iou,
            "min_area": self.min_area,
            "max_area": self.max_area,
            "overlap_iou": self.overlap_iou,
            "many_instances": self.many_instances,
            "near_duplicate_bits": self.near_duplicate_bits,
            "rules": dict(self.rules),
        }
