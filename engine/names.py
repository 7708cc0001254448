"""Human names for things keyed by a fingerprint id (label sets today; fine-tuned teachers next).

An id (``ls-`` + 16 hex digits for a label set, :func:`distillery.engine.store.fingerprint`)
says *what produced* the thing; a name (``coco128-gt``) is what people type. The name is
metadata stored beside the thing, never part of its id.

Rules, shared by every kind of named thing:

* A name is 1 to 64 characters of ASCII letters, digits and ``-_.``, starting with a
  letter or a digit (safe in paths, shells and YAML without quoting). Case matters.
* A name must not be readable as an id or id prefix of its kind (for label sets: ``l``,
  ``ls``, ``ls-`` and ``ls-`` followed by hex digits only), so a query never means both a
  name and an id. ``ls-gt`` is a valid name (``g`` is not hex); a bare hex string such as
  ``2024`` is too, since ids always carry their ``ls-`` prefix.
* Within one collection (a store), a name belongs to at most one thing.

A query (``--labelset``) is resolved by :func:`matches`: an exact name, an exact id, or a
unique id prefix.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

#: Allowed names: 1-64 characters, ``[A-Za-z0-9._-]``, first one a letter or digit.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_id_like(text: str, id_prefix: str) -> bool:
    """True when ``text`` is, or could be the start of, an id ``id_prefix`` + lowercase hex
    (``l``, ``ls``, ``ls-``, ``ls-3f0a`` for ``id_prefix="ls-"``)."""
    if len(text) <= len(id_prefix):
        return id_prefix.startswith(text)
    return text.startswith(id_prefix) and re.fullmatch(r"[0-9a-f]+", text[len(id_prefix):]) is not None


def check_name(name: str, id_prefix: str, what: str = "label set") -> str:
    """``name`` if it is a valid name for a ``what`` whose ids start with ``id_prefix``.

    Raises:
        ValueError: bad characters or length, or the name reads as an id (prefix); the
            message names the rule and gives an example.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{what} name {name!r} is invalid: use 1-64 letters, digits and '-_.', starting with a letter or digit "
            "(e.g. coco128-gt)"
        )
    if is_id_like(name, id_prefix):
        raise ValueError(
            f"{what} name {name!r} reads as an id prefix ({id_prefix}<hex>); choose a name that does not start "
            f"with {id_prefix!r} followed by hex digits only (e.g. coco128-gt)"
        )
    return name


def holder(items: Iterable[T], name: str, name_of: Callable[[T], str | None]) -> T | None:
    """The item of ``items`` that holds ``name`` (None: the name is free)."""
    return next((it for it in items if name_of(it) == name), None)


def matches(query: str, items: Iterable[T], id_of: Callable[[T], str], name_of: Callable[[T], str | None]) -> list[T]:
    """The items ``query`` may mean, in ``items`` order: those named ``query``, plus the one
    whose id is ``query`` or else every item whose id starts with ``query``. One item: the
    query resolves; none: not found; several: ambiguous (the caller lists them)."""
    items = list(items)
    by_name = [it for it in items if name_of(it) == query]
    by_id = [it for it in items if id_of(it) == query] or [it for it in items if id_of(it).startswith(query)]
    out: list[T] = []
    for it in by_name + by_id:
        if all(it is not o for o in out):
            out.append(it)
    return out
