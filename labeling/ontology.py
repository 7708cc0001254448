"""Ontology (prompt -> class) and its split into Grounding DINO prompt chunks.

Grounding DINO reads one caption of at most ``max_text_len`` (256) tokens in which
phrases are separated by `` . `` (IDEA-Research/GroundingDINO, ``groundingdino/util/
inference.py``; transformers ``GroundingDinoProcessor``). A large ontology is therefore
split into several chunks, each run separately, whose results are merged.

Classes are mapped to *token spans*, never to decoded phrases: each prompt's span is
found from the fast tokenizer's character offsets, so prompts sharing words
(``red block`` / ``orange block``) or differing only in case stay distinct columns.
A class score is the mean token probability over the prompt's span, the
"normalised positive map" of mmdetection's GroundingDINO
(``mmdet/models/detectors/glip.py: create_positive_map`` and
``convert_grounding_to_cls_scores``), and the max over the prompts of one class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Token ids the Grounding DINO text encoder treats as phrase delimiters
#: ([CLS], [SEP], ".", "?" in the BERT-uncased vocabulary; transformers
#: ``modeling_grounding_dino.SPECIAL_TOKENS``). They never belong to a class span.
DELIMITER_TOKEN_IDS = (101, 102, 1012, 1029)


class OntologyError(ValueError):
    """The ontology is empty, malformed, or cannot be tokenized into valid prompts."""


@dataclass(frozen=True)
class Ontology:
    """Prompts and the classes they map to.

    Attributes:
        prompts: the text fed to the detector, one entry per prompt, in the user's order.
        prompt_class: for each prompt, the index of its class in ``classes``.
        classes: class names, unique, in order of first appearance. Column ``j`` of a
            label record's ``scores`` is ``classes[j]``.
    """

    prompts: tuple[str, ...]
    prompt_class: tuple[int, ...]
    classes: tuple[str, ...]

    @classmethod
    def from_mapping(cls, mapping: dict[str, str] | list, source: str = "ontology") -> "Ontology":
        """Build from ``{prompt: class}`` (or a list of ``[prompt, class]`` pairs / plain names).

        Raises:
            OntologyError: empty ontology, empty or non-string names, a prompt given twice.
        """
        pairs: list[tuple[str, str]] = []
        if isinstance(mapping, dict):
            pairs = [(k, v) for k, v in mapping.items()]
        elif isinstance(mapping, list):
            for item in mapping:
                if isinstance(item, str):
                    pairs.append((item, item))
                elif isinstance(item, (list, tuple)) and len(item) == 2:
                    pairs.append((item[0], item[1]))
                else:
                    raise OntologyError(f"{source}: entries must be 'name' or [prompt, class], got {item!r}")
        else:
            raise OntologyError(f"{source}: expected a mapping 'prompt: class', got {type(mapping).__name__}")
        if not pairs:
            raise OntologyError(f"{source}: the ontology is empty; give at least one class")
        prompts, prompt_class, classes, index = [], [], [], {}
        for prompt, name in pairs:
            if not isinstance(prompt, str) or not isinstance(name, str) or not prompt.strip() or not name.strip():
                raise OntologyError(f"{source}: prompt and class must be non-empty strings, got {prompt!r}: {name!r}")
            prompt, name = prompt.strip(), name.strip()
            if prompt in prompts:
                raise OntologyError(f"{source}: prompt {prompt!r} is given twice")
            if name not in index:
                index[name] = len(classes)
                classes.append(name)
            prompts.append(prompt)
            prompt_class.append(index[name])
        return cls(tuple(prompts), tuple(prompt_class), tuple(classes))

    @classmethod
    def from_classes(cls, names: str | list[str]) -> "Ontology":
        """Short form: each class is its own prompt. ``names`` is a list or a comma-separated string."""
        if isinstance(names, str):
            names = [n for n in (s.strip() for s in names.split(",")) if n]
        return cls.from_mapping(list(names), source="--classes")

    @classmethod
    def load(cls, path: str | Path) -> "Ontology":
        """Read a YAML file: a mapping ``prompt: class``, or ``{ontology: mapping}``, or a list.

        Raises:
            OntologyError: the file is missing or not valid YAML of those shapes.
        """
        from distillery.engine.config import ConfigError, load_yaml

        p = Path(path)
        try:
            data = load_yaml(p, "ontology")
        except ConfigError as e:
            raise OntologyError(str(e)) from e
        if data is None:
            raise OntologyError(f"{p}: the ontology file is empty; write one 'prompt: class' per line")
        if isinstance(data, dict) and set(data) == {"ontology"}:
            data = data["ontology"]
        return cls.from_mapping(data, source=str(p))

    def to_dict(self) -> dict:
        """JSON-able form stored in label set manifests (prompts as ``[prompt, class]`` pairs)."""
        return {
            "classes": list(self.classes),
            "prompts": [[p, self.classes[c]] for p, c in zip(self.prompts, self.prompt_class)],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Ontology":
        """Inverse of :meth:`to_dict` (class order restored exactly)."""
        onto = cls.from_mapping([list(x) for x in d["prompts"]], source="manifest")
        if list(onto.classes) != list(d["classes"]):
            index = {c: i for i, c in enumerate(d["classes"])}
            return cls(onto.prompts, tuple(index[onto.classes[c]] for c in onto.prompt_class), tuple(d["classes"]))
        return onto


@dataclass(frozen=True)
class PromptChunk:
    """One caption fed to Grounding DINO and how its tokens map back to classes.

    Attributes:
        text: the caption, prompts joined by ``" . "`` and ended by ``" ."``.
        prompt_ids: indices into ``Ontology.prompts`` of the prompts in this chunk.
        positive_map: float32 ``(len(prompt_ids), max_text_len)``; row ``i`` is 1/n on the
            n tokens of prompt ``i``'s span (delimiters excluded), 0 elsewhere.
        num_tokens: tokens in the caption including [CLS] and [SEP].
    """

    text: str
    prompt_ids: tuple[int, ...]
    positive_map: np.ndarray
    num_tokens: int


def _spans(tokenizer, text: str, char_ranges: list[tuple[int, int]]):
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = []
    for a, b in char_ranges:
        toks = [
            t for t, (s, e) in enumerate(offsets)
            if e > s and s >= a and e <= b and ids[t] not in DELIMITER_TOKEN_IDS
        ]
        spans.append(toks)
    return ids, spans


def build_chunks(ontology: Ontology, tokenizer, max_text_len: int = 256) -> list[PromptChunk]:
    """Split the ontology's prompts, in order, into captions of at most ``max_text_len`` tokens.

    Args:
        tokenizer: a *fast* Hugging Face tokenizer (character offsets are needed), e.g.
            ``GroundingDinoProcessor.tokenizer``.
        max_text_len: the text encoder's limit (``GroundingDinoConfig.max_text_len``, 256).

    Raises:
        OntologyError: a prompt alone exceeds the limit; a prompt has no token outside
            the delimiters (e.g. ``"."``); two prompts of different classes tokenize
            identically (e.g. ``Car`` and ``car`` with an uncased vocabulary).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise OntologyError("build_chunks needs a fast tokenizer (character offsets)")
    token_cache: dict[tuple, int] = {}
    for i, prompt in enumerate(ontology.prompts):
        ids, spans = _spans(tokenizer, prompt, [(0, len(prompt))])
        key = tuple(ids[t] for t in spans[0])
        if not key:
            raise OntologyError(f"prompt {prompt!r} has no token besides delimiters ('.', '?'); reword it")
        if len(ids) + 1 > max_text_len:
            raise OntologyError(
                f"prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is {len(ids) - 2} tokens; "
                f"at most {max_text_len - 3} fit in one caption"
            )
        j = token_cache.setdefault(key, i)
        if j != i and ontology.prompt_class[j] != ontology.prompt_class[i]:
            raise OntologyError(
                f"prompts {ontology.prompts[j]!r} and {prompt!r} are the same tokens to this tokenizer "
                f"but map to different classes ({ontology.classes[ontology.prompt_class[j]]!r}, "
                f"{ontology.classes[ontology.prompt_class[i]]!r}); the detector cannot tell them apart"
            )

    chunks: list[PromptChunk] = []
    current: list[int] = []

    def layout(members):
        text, ranges = "", []
        for k in members:
            start = len(text)
            text += ontology.prompts[k]
            ranges.append((start, len(text)))
            text += " . "
        return text.rstrip(" ") , ranges

    def emit(members):
        text, ranges = layout(members)
        ids, spans = _spans(tokenizer, text, ranges)
        pm = np.zeros((len(members), max_text_len), np.float32)
        for row, toks in enumerate(spans):
            if not toks:
                raise OntologyError(f"prompt {ontology.prompts[members[row]]!r} lost its tokens in a caption")
            pm[row, toks] = 1.0 / len(toks)
        chunks.append(PromptChunk(text, tuple(members), pm, len(ids)))

    for i in range(len(ontology.prompts)):
        trial = current + [i]
        text, _ = layout(trial)
        n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
        if n > max_text_len and current:
            emit(current)
            current = [i]
        else:
            current = trial
    emit(current)
    return chunks
