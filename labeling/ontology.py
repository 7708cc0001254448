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
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, RootModel, ValidationError

#: Token ids the Grounding DINO text encoder treats as phrase delimiters
#: ([CLS], [SEP], ".", "?" in the BERT-uncased vocabulary; transformers
#: ``modeling_grounding_dino.SPECIAL_TOKENS``). They never belong to a class span.
DELIMITER_TOKEN_IDS = (101, 102, 1012, 1029)


class OntologyError(ValueError):
    """The ontology is empty, malformed, or cannot be tokenized into valid prompts."""


def _non_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must be a non-empty string")
    return v


#: A prompt or class name: a string with a non-space character (stripped later, by
#: :meth:`Ontology.from_mapping`, so that prompts equal after stripping are caught as repeats).
Text = Annotated[str, AfterValidator(_non_blank)]


def _pair(v):
    """A list entry: ``"name"`` (its own prompt) or ``[prompt, class]``, as a (prompt, class) tuple."""
    if isinstance(v, str):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return tuple(v)
    raise ValueError("must be 'name' or [prompt, class]")


class PromptMap(RootModel[Annotated[dict[Text, Text], Field(min_length=1)]]):
    """An ontology file's usual shape: ``{prompt: class}``, at least one entry, non-empty strings."""

    model_config = ConfigDict(strict=True)


class PromptList(RootModel[Annotated[list[Annotated[tuple[Text, Text], BeforeValidator(_pair)]], Field(min_length=1)]]):
    """The list shape: entries ``"name"`` or ``[prompt, class]``, at least one."""

    model_config = ConfigDict(strict=True)


def _mapping_errors(e: ValidationError, mapping: dict | list, source: str) -> str:
    """One line per offending prompt (dict) or entry (list), each naming ``source``."""
    lines, seen = [], set()
    for err in e.errors(include_url=False):
        loc, value = tuple(err["loc"]), err.get("input")
        if loc[:1] in seen:
            continue
        seen.add(loc[:1])
        if not loc:
            lines.append("the ontology is empty; give at least one class")
            continue
        if err["type"] == "string_type":
            problem = "is empty" if value is None else (
                "is not text (YAML reads unquoted numbers, yes/no, on/off as other types): put it in quotes")
        elif err["type"] == "value_error":
            problem = str(err["ctx"]["error"])
        else:
            problem = f"must be 'name' or [prompt, class] ({err['msg']})"
        if isinstance(mapping, list):
            lines.append(f"entry {loc[0] + 1} ({_short(mapping[loc[0]])}) {problem}")
            continue
        # pydantic's loc turns a key True into 1 and None into 'None': show the key as written
        prompt = next((k for k in mapping if k == loc[0] or str(k) == str(loc[0])), loc[0])
        if "[key]" in loc:
            lines.append(f"prompt {_short(prompt)} {problem}")
        else:
            lines.append(f"prompt {_short(prompt)}: its class {problem}")
    return "\n".join(f"{source}: {line}" for line in lines)


def _short(value, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


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
        """Build from ``{prompt: class}`` (or a list of ``[prompt, class]`` pairs / plain names),
        validated by :class:`PromptMap` / :class:`PromptList`; prompts and classes are stripped.

        Raises:
            OntologyError: not a mapping or list, an empty ontology, an empty or non-string
                prompt or class (one line per offending prompt, naming ``source``), a prompt
                given twice.
        """
        if isinstance(mapping, dict):
            model = PromptMap
        elif isinstance(mapping, list):
            model = PromptList
        else:
            raise OntologyError(f"{source}: expected a mapping 'prompt: class', got {type(mapping).__name__}")
        try:
            validated = model.model_validate(mapping).root
        except ValidationError as e:
            raise OntologyError(_mapping_errors(e, mapping, source)) from e
        pairs = validated.items() if isinstance(validated, dict) else validated
        prompts, prompt_class, classes, index = [], [], [], {}
        for prompt, name in pairs:
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
            OntologyError: the file is missing, empty or not valid YAML, a key is given twice,
                or any error of :meth:`from_mapping`; each line names the file.
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
    for i in range(len(ontology.prompts)):
        trial = current + [i]
        text, _ = _layout(ontology, trial)
        n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
        if n > max_text_len and current:
            chunks.append(caption_chunk(ontology, tokenizer, current, max_text_len))
            current = [i]
        else:
            current = trial
    chunks.append(caption_chunk(ontology, tokenizer, current, max_text_len))
    return chunks


def _layout(ontology: Ontology, members) -> tuple[str, list[tuple[int, int]]]:
    """The caption of prompts ``members`` (in that order) and each prompt's character range."""
    text, ranges = "", []
    for k in members:
        start = len(text)
        text += ontology.prompts[k]
        ranges.append((start, len(text)))
        text += " . "
    return text.rstrip(" "), ranges


def caption_chunk(ontology: Ontology, tokenizer, prompt_ids, max_text_len: int = 256) -> PromptChunk:
    """The caption of the prompts ``prompt_ids``, in that order, and its token spans: the one
    layout and span code that labelling (:func:`build_chunks`) and teacher fine-tuning share.

    Args:
        prompt_ids: indices into ``ontology.prompts`` (at least one).
        tokenizer: a fast Hugging Face tokenizer; max_text_len: as :func:`build_chunks`.

    Raises:
        OntologyError: the caption exceeds ``max_text_len`` tokens, or a prompt has no token
            besides delimiters.
    """
    members = [int(k) for k in prompt_ids]
    if not members:
        raise OntologyError("a caption needs at least one prompt")
    text, ranges = _layout(ontology, members)
    ids, spans = _spans(tokenizer, text, ranges)
    if len(ids) > max_text_len:
        raise OntologyError(f"caption of {len(members)} prompts is {len(ids)} tokens; at most {max_text_len} fit")
    pm = np.zeros((len(members), max_text_len), np.float32)
    for row, toks in enumerate(spans):
        if not toks:
            raise OntologyError(f"prompt {ontology.prompts[members[row]]!r} lost its tokens in a caption")
        pm[row, toks] = 1.0 / len(toks)
    return PromptChunk(text, tuple(members), pm, len(ids))
