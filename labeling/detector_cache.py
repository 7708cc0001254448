"""One image-backbone pass per image batch, reused across Grounding DINO prompt chunks.

An ontology over the text encoder's 256 tokens is split into prompt chunks
(:mod:`distillery.labeling.ontology`), and the teacher calls the model once per chunk on the
same images. transformers' ``GroundingDinoModel.forward`` (5.x) computes from the image
alone, before the text meets the image:

* ``model.backbone`` (``GroundingDinoConvModel``): the Swin feature maps of the backbone
  levels, the pixel mask downsampled to each of them, and their sine position embeddings;
* ``model.input_proj_vision[level]``: the 1x1 conv + GroupNorm projections to ``d_model``,
  and, for the levels past the backbone's, the stride-2 3x3 conv on the last map.

What follows depends on the caption and cannot be reused: every encoder layer starts with
the image-text fusion (``GroundingDinoFusionLayer``), so the deformable self-attention and
the feed-forward of the vision tokens see text-dependent features from layer 1 on; the
decoder cross-attends to both. Left recomputed because they cost next to nothing: the
flattening, ``level_embed``, valid ratios and reference points, and the extra levels' masks
and position embeddings (maps at 1/64 of the input).

:class:`ImageFeatureCache` memoises those submodules' ``forward`` for the duration of a
``with`` block, keyed on the *identity* of the tensors passed to them: a second call with
the very same ``pixel_values`` / ``pixel_mask`` objects (or, for a projection, the very same
feature map, which is the memoised backbone's output) returns the stored output; any other
tensor is computed and stored too. Nothing is assumed about tensor contents, so the cached
path runs the same operations on the same inputs as the uncached one; the model's code is
called, not copied. Outside the block the model is untouched (training, fine-tuning and
any other caller run the normal path), and the stored tensors are released on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


def _fresh(out: Any) -> Any:
    """A copy of ``out``'s containers (lists, tuples), sharing the tensors: the model appends to
    the position-embedding list the backbone returns, which must not grow the stored one."""
    if isinstance(out, list):
        return [_fresh(x) for x in out]
    if isinstance(out, tuple):
        return tuple(_fresh(x) for x in out)
    return out


class ImageFeatureCache:
    """Reuse Grounding DINO's image-only work across calls on the same image tensors.

    Args:
        model: a ``transformers`` ``GroundingDinoForObjectDetection`` (its ``.model``) or
            ``GroundingDinoModel``; a LoRA adapter merged into it (``merge_and_unload``) is
            just weights and changes nothing here.

    Usage::

        cache = ImageFeatureCache(model)
        with cache.reuse():                      # one image batch
            for text in chunks:                  # same pixel_values / pixel_mask objects
                out = model(pixel_values=pv, pixel_mask=pm, **text)

    Inside the block the Swin backbone and the input projections run once per distinct
    input tensor (``calls`` counts the real runs per submodule name); everything else runs
    per call. The inputs must not be modified in place inside the block (identity, not
    content, is the key). Not re-entrant: nested ``reuse()`` raises ``RuntimeError``.

    Raises:
        TypeError: ``model`` has no Grounding DINO ``backbone`` / ``input_proj_vision``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        base = getattr(model, "model", model)
        if not (hasattr(base, "backbone") and hasattr(base, "input_proj_vision")):
            raise TypeError(f"expected a transformers Grounding DINO model, got {type(model).__name__}")
        self.modules = {"backbone": base.backbone}
        self.modules.update({f"input_proj_vision.{i}": m for i, m in enumerate(base.input_proj_vision)})
        self.calls = dict.fromkeys(self.modules, 0)
        self._active = False

    @contextmanager
    def reuse(self) -> Iterator["ImageFeatureCache"]:
        """Memoise the image-only submodules until the block exits (see the class docstring)."""
        if self._active:
            raise RuntimeError("ImageFeatureCache.reuse() is already active (one image batch at a time)")
        self._active = True
        saved = {name: m.__dict__.get("forward") for name, m in self.modules.items()}
        try:
            for name, m in self.modules.items():
                m.forward = self._memoised(name, m.forward)  # instance attribute: the class is untouched
            yield self
        finally:
            for name, m in self.modules.items():
                if saved[name] is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = saved[name]
            self._active = False

    def _memoised(self, name: str, forward):
        entries: list[tuple[tuple, Any]] = []  # (positional args, output); dropped with the closure on exit

        def cached(*args, **kwargs):
            if not kwargs:
                for key, out in entries:
                    if len(key) == len(args) and all(a is b for a, b in zip(key, args)):
                        return _fresh(out)
            out = forward(*args, **kwargs)
            self.calls[name] += 1
            if not kwargs:
                entries.append((args, out))
            return _fresh(out)

        return cached
