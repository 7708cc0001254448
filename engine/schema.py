"""Validation of parsed config files by pydantic v2 models, with one line per bad key.

Config models derive from :class:`StrictConfig` (unknown keys are errors, no type coercion)
and are validated through :func:`validate_config`, which turns pydantic's
:class:`~pydantic.ValidationError` into one line per bad key path::

    teachers.yaml: detector.nms_iou: must be a number in [0.0, 1.0], got 1.5
    teachers.yaml: detector.colour: unknown key; known keys in detector: model, revision, ...

The allowed values are read from the model's own annotations and constraints
(``Literal``, ``Field(ge=..., le=..., multiple_of=...)``, nested models, ``TypedDict``), so
a message cannot drift from the rule it reports.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from typing_extensions import is_typeddict

from distillery.engine.config import ConfigError


class StrictConfig(BaseModel):
    """Base of every config model: unknown keys are errors (``extra="forbid"``) and values
    are not coerced (``strict=True``: ``"4"`` is not an integer, ``true`` is not a number;
    an integer is accepted where a number is expected)."""

    model_config = ConfigDict(extra="forbid", strict=True)


#: Appended when a number arrives as text: YAML 1.1 reads ``1e-3`` (no dot) as a string.
YAML_NUMBER_HINT = " (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)"


def validate_config(model: type[BaseModel], data: Any, source: str, error: type[ValueError] = ConfigError,
                    context: dict | None = None):
    """Validate parsed YAML ``data`` into ``model`` (``model.model_validate(data, context=context)``).

    Args:
        source: what the message names first, usually the file path.
        error: the exception type to raise (a :class:`ValueError` subclass).
        context: passed to the model's validators (e.g. the folder relative paths resolve against).

    Raises:
        error: one line per bad key (see :func:`format_validation_error`).
    """
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise error(format_validation_error(e, model, source)) from e


def format_validation_error(e: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per bad key path, each ``"{source}: {key.path}: {problem}"``.

    The problem states the allowed values or range from ``model``'s annotations (an unknown
    key lists the known keys of its mapping); a custom validator's message is used as is; a
    number given as text gets :data:`YAML_NUMBER_HINT`. Errors at the same key path (e.g.
    from both sides of a union) are reported once.
    """
    lines, seen = [], set()
    for err in e.errors(include_url=False):
        loc = tuple(err["loc"])
        bad_key = "[key]" in loc
        parts = loc[: loc.index("[key]")] if bad_key else loc
        path = _key_path(parts)
        if path in seen:
            continue
        seen.add(path)
        lines.append(f"{source}: {_problem(err, model, parts, path, bad_key)}")
    return "\n".join(lines)


def _key_path(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _short(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _problem(err: dict, model: type[BaseModel], parts: tuple, path: str, bad_key: bool) -> str:
    kind, value = err["type"], err.get("input")
    where = f"{path}: " if path else ""
    if kind in ("value_error", "assertion_error"):
        cause = (err.get("ctx") or {}).get("error")
        return where + (str(cause) if cause is not None else err["msg"])
    if kind == "extra_forbidden" or bad_key:
        parent = _annotation_at(model, parts[:-1])
        key_type = _dict_key_type(parent[0]) if parent and bad_key else None
        if key_type is not None and get_origin(_unwrap(key_type)[0]) is not Literal:
            return f"{path}: the key must be {describe(key_type)}, got {_short(parts[-1])}"
        known = _known_keys(parent[0]) if parent else []
        inside = f" in {_key_path(parts[:-1])}" if len(parts) > 1 else ""
        return f"{path}: unknown key; known keys{inside}: {', '.join(map(str, known)) or 'none'}"
    found = _annotation_at(model, parts)
    allowed = describe(*found) if found else err["msg"]
    if kind == "missing":
        return f"{path}: is required ({allowed})"
    hint = _number_as_text_hint(value) if kind.split("_")[0] in ("int", "float") else ""
    if not path:
        got = "an empty file" if value is None else type(value).__name__
    else:
        got = _short(value)
    return f"{where}must be {allowed}, got {got}{hint}"


def _number_as_text_hint(value: Any) -> str:
    if not isinstance(value, str) or not any(ch.isdigit() for ch in value):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return YAML_NUMBER_HINT if "e" in value.lower() else " (a number in quotes is text: remove the quotes)"


def _unwrap(tp) -> tuple[Any, list, bool]:
    """Strip ``Annotated`` (collecting its metadata) and ``X | None``; returns (type, metadata, nullable)."""
    meta, nullable = [], False
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            args = get_args(tp)
            tp, meta = args[0], meta + list(args[1:])
        elif origin in (Union, types.UnionType) and type(None) in get_args(tp):
            rest = [a for a in get_args(tp) if a is not type(None)]
            nullable = True
            if len(rest) != 1:
                return Union[tuple(rest)], meta, nullable
            tp = rest[0]
        else:
            flat = []
            for m in meta:
                flat.extend(m.metadata if isinstance(m, FieldInfo) else [m])
            return tp, flat, nullable


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _known_keys(tp) -> list:
    tp = _unwrap(tp)[0]
    if _is_model(tp):
        return list(tp.model_fields)
    if is_typeddict(tp):
        return list(typing.get_type_hints(tp))
    key = _dict_key_type(tp)
    if key is not None and get_origin(_unwrap(key)[0]) is Literal:
        return list(get_args(_unwrap(key)[0]))
    return []


def _dict_key_type(tp):
    tp = _unwrap(tp)[0]
    return get_args(tp)[0] if get_origin(tp) is dict and get_args(tp) else None


def _annotation_at(model, parts: tuple):
    """(annotation, metadata) of the value at key path ``parts`` inside ``model``, or None."""
    tp, meta = model, []
    for part in parts:
        tp = _unwrap(tp)[0]
        if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
            f = tp.model_fields[part]
            tp, meta = f.annotation, list(f.metadata)
        elif is_typeddict(tp) and part in typing.get_type_hints(tp):
            tp, meta = typing.get_type_hints(tp, include_extras=True)[part], []
        elif get_origin(tp) is dict:
            tp, meta = get_args(tp)[1], []
        elif get_origin(tp) is list and isinstance(part, int):
            tp, meta = get_args(tp)[0], []
        else:
            return None
    return tp, meta


def describe(tp, meta: list | tuple = ()) -> str:
    """What a value of annotation ``tp`` (with constraint ``meta``) may be, in words:
    ``"a number in [0.0, 1.0]"``, ``"a positive integer and a multiple of 32"``,
    ``"one of fp32, fp16, bf16"``, ``"a mapping with keys confident, below"``, ``"..., or null"``."""
    tp, more, nullable = _unwrap(tp)
    meta = [*(m for x in meta for m in (x.metadata if isinstance(x, FieldInfo) else [x])), *more]
    c = {k: getattr(m, k) for m in meta for k in ("ge", "gt", "le", "lt", "multiple_of", "min_length")
         if getattr(m, k, None) is not None}
    origin = get_origin(tp)
    if origin is Literal:
        values = [a for a in get_args(tp) if a is not None]
        nullable = nullable or None in get_args(tp)
        text = "one of " + ", ".join(map(str, values))
    elif tp is bool:
        text = "true or false"
    elif tp in (int, float):
        noun = "an integer" if tp is int else "a number"
        lo = ("[", c["ge"]) if "ge" in c else (("(", c["gt"]) if "gt" in c else None)
        hi = (c["le"], "]") if "le" in c else ((c["lt"], ")") if "lt" in c else None)
        if tp is int and hi is None and lo in (("[", 1), ("(", 0)):
            text = "a positive integer"
        elif tp is int and hi is None and lo == ("[", 0):
            text = "a non-negative integer"
        elif lo and hi:
            text = f"{noun} in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
        elif lo:
            text = f"{noun} {'>=' if lo[0] == '[' else '>'} {lo[1]}"
        elif hi:
            text = f"{noun} {'<=' if hi[1] == ']' else '<'} {hi[0]}"
        else:
            text = noun
        if "multiple_of" in c:
            text += f" and a multiple of {c['multiple_of']}"
    elif tp is str:
        text = "a non-empty string" if c.get("min_length", 0) >= 1 else "a string"
    elif _is_model(tp) or is_typeddict(tp):
        text = "a mapping with keys " + ", ".join(_known_keys(tp))
    elif origin is dict:
        k, v = get_args(tp)
        text = f"a mapping from {describe(k)} to {describe(v)}"
    else:
        text = getattr(tp, "__name__", str(tp))
    return text + (", or null" if nullable else "")
