"""Write a conversion's output folder atomically, and never into a folder that holds someone else's files.

`write_folder_atomically(out_dir, write, own_files)`: `write(tmp)` fills a fresh temporary sibling
folder, which is then renamed to `out_dir`. An existing `out_dir` must be empty or hold only files
this conversion writes (`own_files`: a previous output, which is then replaced once the new one is
complete); anything else is refused with a ValueError naming the folder. A failure leaves `out_dir`
as it was and no temporary folder behind (`flowmap_jax.core.atomic_folder.replace_folder_atomically`, shared with
the export writer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from flowmap_jax.core.atomic_folder import replace_folder_atomically

__all__ = ["check_output_folder", "replace_folder_atomically", "write_folder_atomically"]


def check_output_folder(out_dir: Path, own_files: Iterable[str], command: str) -> None:
    """ValueError if `out_dir` is a file, lies under a file, or holds files other than `own_files`."""
    out_dir = Path(os.path.abspath(out_dir))
    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == out_dir else f"lies under {probe}, which is a file"
        raise ValueError(f"output folder {out_dir} {where}; choose a folder")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in set(own_files))
        if foreign:
            raise ValueError(f"refusing to write into {out_dir}: it holds files that `{command}` did not write "
                             f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose an empty or "
                             f"new output folder")


def write_folder_atomically(out_dir, write: Callable[[Path], None], own_files: Iterable[str], command: str) -> Path:
    """Check `out_dir` (`check_output_folder`), then `replace_folder_atomically`. Returns `out_dir` (absolute)."""
    out_dir = Path(os.path.abspath(out_dir))
    check_output_folder(out_dir, own_files, command)
    return replace_folder_atomically(out_dir, write)
