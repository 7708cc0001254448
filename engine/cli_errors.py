"""How every ``distillery`` command reports errors the user can fix: one line, no traceback."""

from __future__ import annotations

import functools

import click


class UserError(click.ClickException):
    """An error caused by input the user can fix; printed without a traceback."""


def fail_cleanly(fn):
    """Decorator: source, store, config and value errors and missing/existing files become
    :class:`UserError` (their message, exit status 1); anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from engine.images import SourceError
        from engine.store import StoreError

        user_errors = (SourceError, StoreError, FileNotFoundError, FileExistsError, ValueError)
        try:
            return fn(*args, **kwargs)
        except user_errors as e:
            raise UserError(str(e)) from e

    return wrapper
