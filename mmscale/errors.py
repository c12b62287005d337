"""The errors a user is expected to meet, each with the exit code of the `mmscale` command.

An expected failure (a bad config, a missing file, a damaged checkpoint) is an `MmscaleError`:
`mmscale.cli.main` prints its message as `mmscale: <message>` and exits with its `exit_code`,
with the traceback only under `--debug`. Anything else is a bug and keeps its traceback.
This module imports nothing of mmscale, so every other module may use it.
"""

from __future__ import annotations

EXIT_FAILURE = 1  # the input was fine, the work failed (a conversion that could not finish, ...)
EXIT_BAD_INPUT = 2  # the user's config, path or file cannot be used as given
EXIT_INTERRUPTED = 130  # stopped by a second Ctrl-C (128 + SIGINT), as shells report it


class MmscaleError(Exception):
    """An expected failure: its message names the file, key or value and the fix."""

    exit_code: int = EXIT_FAILURE


class BadInputError(MmscaleError):
    """The user's config, path or file cannot be used as given (exit code 2)."""

    exit_code = EXIT_BAD_INPUT
