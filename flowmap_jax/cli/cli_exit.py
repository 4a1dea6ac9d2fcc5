"""Exit codes, one-line errors and the closed-pipe rule, shared by every command line of the project.

    0  done (also: `--help`, and output cut short by a closed pipe such as `... --help | head -1`)
    1  runtime failure: the work started and failed (NaN loss, no readable checkpoint, a crash)
    2  usage or bad input: an unknown flag, a bad value, a file or folder named on the command line that is
       missing or of the wrong kind, data that does not match the run; or an extra the command needs is not
       installed (`EXTRAS`: `python -m flowmap_jax.train` after `pip install "flowmap-jax[torch]"`)
  130  interrupted (Ctrl-C)

A user's mistake is reported on stderr as one line, `error: ...` (argparse-style commands: `PROG: error:
...`), without a traceback. An unexpected exception (a bug) keeps its traceback and exits 1.

Which failure gets which code is decided here, once: error classes mix in `BadInput` (2) or `RunFailure` (1)
next to their usual base (`ValueError`, `OSError`...), and `exit_code(error)` maps an exception to 2 or 1
(a missing file or folder is bad input, any other OSError such as a full disk a failed run) or to None for
anything else (a bug: let it raise).

Each command's `main(argv) -> int` maps its own exceptions to 0/1/2 (so tests can call it in-process);
its `if __name__ == "__main__":` block is `cli_exit.run_main(main)`, which adds the closed-pipe and Ctrl-C
rules and the missing-extra rule for imports inside `main`. A command that needs an extra at the top of its
module wraps those imports (`except ModuleNotFoundError as missing: cli_exit.exit_if_missing_extra(missing,
__name__); raise`). Pure Python: the PyTorch reference uses it too.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import NoReturn

OK = 0
FAILURE = 1
USAGE = 2
INTERRUPTED = 130


# The optional extras of pyproject.toml that commands need, by the top-level modules they install (and those the
# installed packages bring: jaxlib with jax). A command that imports one of them while it is not installed exits
# with USAGE and one line naming the extra (`missing_extra`, `one_line`).
EXTRAS = {
    "jax": ("jax", "jaxlib", "flax", "optax", "orbax", "sklearn", "tensorboardX", "tyro"),
    "torch": ("torch", "diffusers", "transformers", "peft"),
}


class BadInput(Exception):
    """Mixin: the command's input is wrong (a flag, or a file or folder a flag names). Exit code 2 (USAGE)."""


class RunFailure(Exception):
    """Mixin: the work started and could not go on (NaN, disk full, unreadable checkpoints, a run folder in
    use). Exit code 1 (FAILURE)."""


def missing_extra(error: BaseException | str) -> str | None:
    """The extra of `EXTRAS` to install when `error` is a ModuleNotFoundError for one of its modules and that
    module is not installed; None otherwise (a submodule missing from an installed package is a bug or a version
    mismatch, not a missing extra)."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    top = error.name.split(".")[0]
    extra = next((name for name, modules in EXTRAS.items() if top in modules), None)
    if extra is None:
        return None
    try:
        installed = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # a package that cannot even be looked up is not usable either
        installed = False
    return None if installed else extra


def exit_code(error: BaseException) -> int | None:
    """USAGE or FAILURE for a known failure; None for anything else (a bug: let it raise with its traceback).
    A missing file or folder (FileNotFoundError, NotADirectoryError) is bad input; any other OSError (disk
    full, permissions) a failed run, except a closed stdout pipe (BrokenPipeError: None, so that it reaches
    `run_main`'s closed-pipe rule). A module of a missing extra (`missing_extra`) is USAGE."""
    if isinstance(error, BrokenPipeError):
        return None
    if isinstance(error, BadInput) or missing_extra(error):
        return USAGE
    if isinstance(error, RunFailure):
        return FAILURE
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        return USAGE
    if isinstance(error, OSError):  # disk full, permissions... while running
        return FAILURE
    return None


def one_line(error: BaseException | str) -> str:
    """The message of `error` on one line (inner newlines folded into '; '); for a module of a missing extra,
    with the pip command that installs it."""
    text = str(error).strip() or type(error).__name__
    text = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    extra = missing_extra(error)
    if extra:
        text += f' (this needs the "{extra}" extra: pip install "flowmap-jax[{extra}]")'
    return text


def report(error: BaseException | str) -> None:
    """Print `error: <message>` as one line on stderr."""
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (`PROG: error: MESSAGE (see PROG --help)` on stderr, exit 2)
    and a `--help` that ends quietly when its reader closes the pipe (`--help | head -1`), so a command
    keeps both rules even without `run_main`. Subparsers made from it are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def print_help(self, file=None) -> None:
        try:
            super().print_help(file)
            (file or sys.stdout).flush()
        except BrokenPipeError:
            _silence_stdout()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout already closed or not a real file
        pass


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """`sys.exit(main())` for a `__main__` block, with the shared rules: a closed stdout pipe ends the
    command quietly with 0 (what was asked was done; the reader stopped listening), Ctrl-C ends it with
    one line and 130. `main`'s own return value or SystemExit code (argparse: 0 for --help, 2 for bad
    usage) passes through unchanged. A module of a missing extra imported inside `main` (`missing_extra`):
    one line and USAGE."""
    try:
        try:
            code = main()
        except SystemExit as done:
            code = done.code
        except ModuleNotFoundError as missing:
            if missing_extra(missing) is None:
                raise
            report(missing)
            code = USAGE
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        code = OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        code = INTERRUPTED
    sys.exit(code)


def exit_if_missing_extra(error: ModuleNotFoundError, module_name: str) -> None:
    """For a command's module-level imports of an extra's packages (`except ModuleNotFoundError as missing:
    cli_exit.exit_if_missing_extra(missing, __name__); raise`): run as a command (`module_name` "__main__")
    without the extra, one line on stderr and exit USAGE; imported as a module, nothing (the caller re-raises)."""
    if module_name == "__main__" and missing_extra(error):
        report(error)
        sys.exit(USAGE)
