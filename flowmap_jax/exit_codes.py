"""Exit codes of the command-line programs, and the two kinds of failure that choose them.

    0  done (or saved and stopped on SIGTERM)
    1  the run failed while running (RunFailure): NaN loss, disk full while writing a checkpoint,
       no readable checkpoint, the run folder held by another run
    2  bad input (BadInput): a bad flag, or a file or folder that a flag names is missing or unusable
       (--run.dir a file, a teacher UNet config with an unsupported key, truncated weights, data of
       the wrong shape, a resume with a configuration that differs from the run's)

Error classes mix in `BadInput` or `RunFailure` next to their usual base (`ValueError`, `OSError`...);
`exit_code` is the one place that maps an exception to a code, and `one_line` the message printed as
`error: ...` on stderr. Pure Python (no jax).
"""

from __future__ import annotations

DONE = 0
RUN_FAILED = 1
BAD_INPUT = 2


class BadInput(Exception):
    """Mixin: the command's input is wrong (a flag, or a file or folder a flag names). Exit code 2."""


class RunFailure(Exception):
    """Mixin: the run could not go on (NaN, disk full, unreadable checkpoints, folder in use). Exit code 1."""


def exit_code(error: BaseException) -> int | None:
    """BAD_INPUT or RUN_FAILED for a known failure; None for anything else (a bug: let it raise).
    A missing file or folder (FileNotFoundError, NotADirectoryError) is bad input; any other OSError
    (disk full, permissions) a failed run."""
    if isinstance(error, BadInput):
        return BAD_INPUT
    if isinstance(error, RunFailure):
        return RUN_FAILED
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return BAD_INPUT
    if isinstance(error, OSError):  # disk full, permissions... while running
        return RUN_FAILED
    return None


def one_line(error: BaseException) -> str:
    """The error's message on one line (line breaks become '; ')."""
    text = str(error).strip() or type(error).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
