"""How every ``distillery`` command reports errors the user can fix: one line, no traceback."""

from __future__ import annotations

import functools
import sys

import click


class UserError(click.ClickException):
    """An error caused by input the user can fix; printed without a traceback."""


def install_hint(extra: str) -> str:
    """How to install the optional extra ``extra`` (``pyproject.toml``'s
    ``[project.optional-dependencies]``), from PyPI, a checkout or a built wheel."""
    return (f"pip install 'distillery[{extra}]' (in a checkout: pip install -e '.[{extra}]'; "
            f"with the wheel: pip install 'dist/distillery-VERSION-py3-none-any.whl[{extra}]')")


class MissingExtra(ImportError):
    """A package of an optional extra is not installed; the message names it and
    :func:`install_hint`. :func:`fail_cleanly` prints it in one line."""


#: Top-level packages whose connection failures mean FiftyOne's database is not reachable.
DATABASE_PACKAGES = ("fiftyone", "pymongo", "mongoengine", "motor")


def is_database_failure(e: BaseException) -> bool:
    """True if ``e`` is a failure to reach FiftyOne's MongoDB: a ``pymongo`` ``ConnectionFailure``
    (``ServerSelectionTimeoutError``, ``AutoReconnect``...), or a ``ConnectionError`` raised in
    FiftyOne, pymongo or mongoengine code (FiftyOne raises ``ConnectionError("Could not connect
    to `mongod`")``); checked along the chain of causes."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        errors = sys.modules.get("pymongo.errors")
        if errors is not None and isinstance(e, errors.ConnectionFailure):
            return True
        if isinstance(e, ConnectionError):
            tb = e.__traceback__
            while tb is not None:
                if tb.tb_frame.f_globals.get("__name__", "").split(".")[0] in DATABASE_PACKAGES:
                    return True
                tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return False


def fail_cleanly(fn):
    """Decorator: source, store, config and value errors, a missing optional extra
    (:class:`MissingExtra`), file problems (missing, existing, permission, directory) and
    connection failures become :class:`UserError` (their message,
    exit status 1); a failure to reach FiftyOne's database (:func:`is_database_failure`, and
    only that) says so; anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from distillery.engine.images import SourceError
        from distillery.engine.store import StoreError

        user_errors = (SourceError, StoreError, FileNotFoundError, FileExistsError, PermissionError,
                       IsADirectoryError, NotADirectoryError, ValueError, MissingExtra)
        try:
            return fn(*args, **kwargs)
        except user_errors as e:
            raise UserError(str(e)) from e
        except Exception as e:
            if is_database_failure(e):  # FiftyOne's MongoDB (another command may be starting it)
                raise UserError(f"{e}: the database is not reachable; if another command is starting it, retry in "
                                "a few seconds") from e
            if isinstance(e, ConnectionError):
                raise UserError(f"connection failed: {e}") from e
            raise

    return wrapper
