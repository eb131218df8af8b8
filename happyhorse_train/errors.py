"""Errors that end a command with one clear line instead of a traceback, and how entry points report them."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class ClearError(Exception):
    """An error whose message says all a user needs; entry points print it on one line, no traceback."""


class UserInputError(ClearError, ValueError):
    """A bad path, config value or file. A ValueError too, so library callers can catch it the way they
    catch diffusers' own input errors."""


class RunHalted(ClearError, RuntimeError):
    """A run stopped itself on purpose (e.g. too many non-finite steps); what was saved is intact."""


def report_user_errors(main: F) -> F:
    """Wrap an entry point so a `ClearError` prints `error: <message>` and exits with status 2, Ctrl-C one
    line and 130, and a closed pipe on stdout nothing and 0."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ClearError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops at a checkpoint instead)
            print("error: interrupted; every file written completely is kept (each is written whole, then "
                  "renamed), so running the command again continues from them", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`... | head`): what it wanted was printed
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
            sys.exit(0)

    return wrapper  # type: ignore[return-value]
