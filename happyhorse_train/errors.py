"""Errors that mean "the user asked for something we cannot do", and how entry points report them."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserInputError(ValueError):
    """A bad path, config value or file. Entry points print its message on one line, no traceback.

    It subclasses ValueError so library callers can catch it the way they catch diffusers' own input errors.
    """


def report_user_errors(main: F) -> F:
    """Wrap an entry point so a `UserInputError` prints `error: <message>` and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserInputError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
