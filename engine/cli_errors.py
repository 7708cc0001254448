"""How every ``distillery`` command reports errors the user can fix: one line, no traceback."""

from __future__ import annotations

import functools

import click


class UserError(click.ClickException):
    """An error caused by input the user can fix; printed without a traceback."""


def fail_cleanly(fn):
    """Decorator: source, store, config and value errors, file problems (missing, existing,
    permission, directory) and an unreachable database become :class:`UserError` (their
    message, exit status 1); anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from distillery.engine.images import SourceError
        from distillery.engine.store import StoreError

        user_errors = (SourceError, StoreError, FileNotFoundError, FileExistsError, PermissionError,
                       IsADirectoryError, NotADirectoryError, ValueError)
        try:
            return fn(*args, **kwargs)
        except user_errors as e:
            raise UserError(str(e)) from e
        except ConnectionError as e:  # FiftyOne's MongoDB (another command may be starting it)
            raise UserError(f"{e}: the database is not reachable; if another command is starting it, retry in a "
                            "few seconds") from e

    return wrapper
