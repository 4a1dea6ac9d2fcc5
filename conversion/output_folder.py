"""Write a conversion's output folder atomically, and never into a folder that holds someone else's files.

`write_folder_atomically(out_dir, write, own_files)`: `write(tmp)` fills a fresh temporary sibling
folder, which is then renamed to `out_dir`. An existing `out_dir` must be empty or hold only files
this conversion writes (`own_files`: a previous output, which is then replaced once the new one is
complete); anything else is refused with a ValueError naming the folder. A failure leaves `out_dir`
as it was and no temporary folder behind. Files get the normal permissions (0666 and folders 0777,
less the umask) rather than mkstemp's private 0600.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path


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


def replace_folder_atomically(out_dir, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a fresh temporary sibling of `out_dir`, give its entries the normal permissions,
    then rename it to `out_dir`; an existing `out_dir` is moved aside first and deleted only once the new
    folder is in place. Any failure removes the temporary folder and leaves `out_dir` as it was. No check of
    what `out_dir` holds: callers apply their own rule first. Returns `out_dir` (absolute)."""
    out_dir = Path(os.path.abspath(out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp/mkstemp create private (0700/0600) entries
        for entry in tmp.iterdir():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
