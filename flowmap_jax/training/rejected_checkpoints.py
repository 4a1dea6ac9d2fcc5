"""Checkpoints that failed to restore are moved aside, never deleted: `<checkpoints>/rejected/<step>-<reason>`.

Resume falls back from an unreadable or corrupted newest checkpoint to an older one (see
`checkpointing.Checkpointer.restore`). The rejected step folder must then leave the step's place, or
the run's own save at that step later collides with it; it is kept under rejected/ for inspection.
Orbax lists only numeric folder names as steps, so rejected/ is never mistaken for one. The `<reason>` is the
stable slug of the `run_record.RejectReason` that `run_record.verify` returned. Pure Python.
"""

from __future__ import annotations

import os

REJECTED_DIR = "rejected"


def set_aside(directory: str, step: int, reason) -> str | None:
    """Move `<directory>/<step>` to `<directory>/rejected/<step>-<reason.slug>` (`reason`: a
    `run_record.RejectReason`; a numbered suffix if that exists). Returns the new path, or None if the
    step folder is not there."""
    source = os.path.join(directory, str(step))
    if not os.path.isdir(source):
        return None
    target_dir = os.path.join(directory, REJECTED_DIR)
    os.makedirs(target_dir, exist_ok=True)
    base = f"{step}-{reason.slug}"
    target, n = os.path.join(target_dir, base), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(target_dir, f"{base}-{n}")
    os.rename(source, target)
    return target
