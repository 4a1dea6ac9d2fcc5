"""Replace a folder atomically: `replace_folder_atomically(out_dir, write)`.

`write(tmp)` fills a fresh temporary sibling folder, which is then renamed to `out_dir`; an existing
`out_dir` is moved aside first and deleted only once the new folder is in place. A failure leaves `out_dir`
as it was and no temporary folder behind. Files get the normal permissions (0666 and folders 0777, less the
umask) rather than mkstemp's private 0600. Used by the export writer (`flowmap_jax.training.export_writer`) and the
conversion command line (`conversion.output_folder`, `conversion.pipeline_export`). Pure Python.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


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
