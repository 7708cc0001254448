"""Tiny random grounded-segmenter teachers (``distillery teachers tiny --kind sam3``).

``write_tiny_grounded_teachers(out_dir, "sam3")`` writes a random transformers ``Sam3Model`` of the
real architecture and its real processor into ``out_dir/sam3/`` (loaded by ``from_pretrained`` like
``facebook/sam3``) and a preset ``teachers.yaml`` whose ``teacher: {kind: sam3, model: sam3}``
labels alone (no detector or segmenter is written: a grounded preset does not use them).
As :mod:`distillery.labeling.tiny`, the weights are random and the labels meaningless.
"""

from __future__ import annotations

from pathlib import Path

import yaml

#: ``teacher.kind`` values :func:`write_tiny_grounded_teachers` writes.
TINY_GROUNDED_KINDS = ("sam3",)


def sam3_config(tokenizer, size: str = "tiny"):
    """``Sam3Config`` whose CLIP text config has ``tokenizer``'s special ids.

    ``full``: ``Sam3Config()``'s defaults, the architecture of ``facebook/sam3`` (ViT of width 1024
    and 32 layers on a 1008x1008 input in 14-pixel patches, CLIP text encoder of width 1024 and 24
    layers over CLIP's 49408-token vocabulary, DETR encoder and decoder of 6 layers at width 256
    with 200 queries, mask decoder at width 256); ``tokenizer``'s ids (a smaller made-up
    vocabulary, :func:`distillery.labeling.tiny.tiny_clip_tokenizer`) all index that table.
    ``tiny``: the same input, patch grid, FPN levels (288, 144, 72 px; masks at 288x288), window
    size, 32 text positions and 200 queries, with every width 32, one or two layers per part, and
    ``tokenizer``'s vocabulary size.
    """
    from transformers import CLIPTextConfig, Sam3Config
    from transformers.models.sam3.configuration_sam3 import (
        Sam3DETRDecoderConfig, Sam3DETREncoderConfig, Sam3GeometryEncoderConfig, Sam3MaskDecoderConfig,
        Sam3VisionConfig, Sam3ViTConfig,
    )

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if size == "full":
        default = Sam3Config().text_config.to_dict()
        return Sam3Config(text_config=CLIPTextConfig(**{**default, **ids}))
    if size != "tiny":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    width = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
    return Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=Sam3ViTConfig(num_hidden_layers=2, global_attn_indexes=[1],
                                                                     **width), fpn_hidden_size=32),
        text_config=CLIPTextConfig(num_hidden_layers=1, max_position_embeddings=32, projection_dim=32,
                                   hidden_act="gelu", vocab_size=len(tokenizer), **width, **ids),
        geometry_encoder_config=Sam3GeometryEncoderConfig(num_layers=1, **width),
        detr_encoder_config=Sam3DETREncoderConfig(num_layers=1, **width),
        detr_decoder_config=Sam3DETRDecoderConfig(num_layers=2, **width),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=32, num_attention_heads=2),
    )


def write_tiny_sam3(out: Path, seed: int = 0, size: str = "tiny") -> Path:
    """Save a random ``Sam3Model`` (:func:`sam3_config`) and a ``Sam3Processor`` (the default
    ``Sam3ImageProcessor``, 1008x1008, and a 32-position
    :func:`~distillery.labeling.tiny.tiny_clip_tokenizer`) to the folder ``out``. The decoder's
    reference boxes (``detr_decoder.reference_points``, cxcywh before a sigmoid) are drawn from
    N(0, 1) instead of the init's N(0, 0.02): at the init every query's box is the centre half
    of the frame and the merge leaves one instance per image; spread, they cover the frame."""
    import torch
    from transformers import Sam3ImageProcessor, Sam3Model, Sam3Processor

    from distillery.labeling.tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(max_length=32)
    config = sam3_config(tokenizer, size)
    torch.manual_seed(seed)
    model = Sam3Model(config).eval()
    with torch.no_grad():
        model.detr_decoder.reference_points.weight.normal_(0.0, 1.0)
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_tiny_grounded_teachers(out_dir: str | Path, kind: str = "sam3", seed: int = 0, size: str = "tiny") -> Path:
    """Write a random grounded teacher of ``kind`` into ``out_dir/<kind>/`` and a preset
    ``out_dir/teachers.yaml`` using it alone; returns the preset's path.

    Raises:
        ValueError: an unknown ``kind`` or ``size``.
    """
    if kind not in TINY_GROUNDED_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TINY_GROUNDED_KINDS)}, got {kind!r}")
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    out = Path(out_dir)
    write_tiny_sam3(out / kind, seed, size)
    preset = {
        # random weights give every query a middling score: cap the instances as the tiny detectors do
        "teacher": {"kind": kind, "model": kind, "box_floor": 0.05, "nms_iou": 0.7, "max_detections": 20,
                    "batch_size": 4, "actors": 1},
        "device": "auto",
        "precision": "fp32",
    }
    what = "Full-size (SAM 3)" if size == "full" else "Tiny (sam3)"
    path = out / "teachers.yaml"
    path.write_text(f"# {what} RANDOM-WEIGHT grounded teacher written by `distillery teachers tiny`: its labels "
                    "are meaningless.\n" + yaml.safe_dump(preset, sort_keys=False))
    return path
