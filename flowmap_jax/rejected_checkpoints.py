"""Checkpoints that failed to restore are moved aside, never deleted: `<checkpoints>/rejected/<step>-<reason>`.

Resume falls back from an unreadable or corrupted newest checkpoint to an older one (see
`checkpointing.Checkpointer.restore`). The rejected step folder must then leave the step's place, or
the run's own save at that step later collides with it; it is kept under rejected/ for inspection.
Orbax lists only numeric folder names as steps, so rejected/ is never mistaken for one. Pure Python.
"""

from __future__ import annotations

import os
import re

REJECTED_DIR = "rejected"


def reason_slug(reason: str) -> str:
    """A short folder-name word for why a checkpoint was rejected."""
    text = reason.lower()
    if "fingerprint" in text:
        return "fingerprint-mismatch"
    if "metadata" in text:
        return "bad-metadata"
    return "unreadable"


def set_aside(directory: str, step: int, reason: str) -> str | None:
    """Move `<directory>/<step>` to `<directory>/rejected/<step>-<slug>` (a numbered suffix if that
    exists). Returns the new path, or None if the step folder is not there."""
    source = os.path.join(directory, str(step))
    if not os.path.isdir(source):
        return None
    target_dir = os.path.join(directory, REJECTED_DIR)
    os.makedirs(target_dir, exist_ok=True)
    base = f"{step}-{re.sub(r'[^a-z0-9-]+', '-', reason_slug(reason))}"
    target, n = os.path.join(target_dir, base), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(target_dir, f"{base}-{n}")
    os.rename(source, target)
    return target
