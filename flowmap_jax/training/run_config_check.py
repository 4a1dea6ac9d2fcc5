"""A resumed run keeps its configuration: compare the new flags with the run's config.json.

The first start writes `<run>/config.json`; a resume never rewrites it. Instead the new configuration
is compared field by field with the run's effective configuration (config.json, then each accepted
change in config_changes.jsonl applied in order). Fields in `MAY_CHANGE` may differ (how long, how
often to log, sample and save, where the processes and devices are); any other difference is a
`ConfigChanged` error naming every such field with its old and new value, unless
`--run.allow_config_change` is given: then the changes are appended to `<run>/config_changes.jsonl`
({"time", "changes": {"section.field": [old, new]}}) and the run goes on with the new values.
The objective options are compared as `spec.objective_options.ObjectiveOptions` reads them, so a run written
before an option was added or renamed to its canonical spelling resumes without a change.
Pure Python (no jax).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from flowmap_jax.cli.cli_exit import BadInput
from flowmap_jax.spec.objective_options import ObjectiveOptions

CONFIG_NAME = "config.json"
CHANGES_NAME = "config_changes.jsonl"
OPTIONS_PREFIX = "objective.options."

MAY_CHANGE = frozenset({
    "preset",  # informational: the fields themselves are compared
    "run.dir", "run.steps", "run.resume", "run.log_every", "run.sample_every", "run.checkpoint_every",
    "run.keep_checkpoints", "run.async_checkpoints", "run.progress_bar", "run.export", "run.quality_samples",
    "run.compilation_cache", "run.allow_config_change",
    "model.remat",  # memory only: the same function
    "mesh.data", "mesh.fsdp", "mesh.fsdp_min_size",  # checkpoints restore onto any mesh; the global batch is fixed
    "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id", "distributed.auto",
    "sample.jumps", "sample.teacher_steps", "sample.grid_columns", "sample.spacing",  # evaluation only
})
"""Fields a resume may change. Everything else (seed, data, batch size, teacher, objective, optimiser,
dtype) decides what the checkpointed state and data position mean, and must stay."""


class ConfigChanged(BadInput, ValueError):
    """A resume with a configuration that differs from the run's in fields outside MAY_CHANGE."""


def flatten(config: dict) -> dict:
    """{"run": {"steps": 3}, "preset": "x"} -> {"run.steps": 3, "preset": "x"}; lists become tuples."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def effective_config(run_dir: str) -> dict | None:
    """The run's configuration, flattened: config.json with the accepted changes applied; None if
    the run has no config.json."""
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = flatten(json.load(f))
    except (OSError, ValueError) as error:
        raise ConfigChanged(f"cannot read the run's configuration {path}: {error}") from None
    changes_path = os.path.join(run_dir, CHANGES_NAME)
    if os.path.isfile(changes_path):
        with open(changes_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                for key, (_, new) in record.get("changes", {}).items():
                    config[key] = tuple(new) if isinstance(new, list) else new
    return config


def canonical_options(config: dict) -> dict:
    """A flattened config with its `objective.options.*` fields as `ObjectiveOptions` holds them (every current
    option, old spellings read, defaults filled in); unchanged if they do not read as options."""
    nested: dict = {}
    for key, value in config.items():
        if key.startswith(OPTIONS_PREFIX):
            *parents, leaf = key[len(OPTIONS_PREFIX):].split(".")
            target = nested
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = value
    if not nested:
        return config
    try:
        options = dataclasses.asdict(ObjectiveOptions.create(nested))
    except (TypeError, ValueError):
        return config
    out = {key: value for key, value in config.items() if not key.startswith(OPTIONS_PREFIX)}
    out.update(flatten({"objective": {"options": options}}))
    return out


def differences(old: dict, new: dict) -> dict:
    """{field: (old, new)} for every flattened field outside MAY_CHANGE whose values differ (a field
    missing on one side shows as None; the objective options compared through `canonical_options`)."""
    old, new = canonical_options(old), canonical_options(new)
    out = {}
    for key in sorted(set(old) | set(new)):
        if key in MAY_CHANGE:
            continue
        a, b = old.get(key), new.get(key)
        if a != b:
            out[key] = (a, b)
    return out


def check_resume(run_dir: str, new_config: dict, allow_change: bool) -> dict:
    """Compare `new_config` (TrainConfig.to_dict()) with the run's; returns the accepted changes
    ({} if none). Raises ConfigChanged unless `allow_change`. Writes nothing (see `record_changes`)."""
    old = effective_config(run_dir)
    if old is None:
        return {}
    changed = differences(old, flatten(json.loads(json.dumps(new_config))))
    if changed and not allow_change:
        listing = ", ".join(f"{key} {old_value!r} -> {new_value!r}" for key, (old_value, new_value) in changed.items())
        raise ConfigChanged(f"{run_dir} was started with another configuration: {listing}; resume with the run's "
                            f"values, choose another --run.dir, or pass --run.allow_config_change true to go on "
                            f"with the new values (recorded in {CHANGES_NAME})")
    return changed


def record_changes(run_dir: str, changes: dict) -> None:
    """Append accepted changes to <run>/config_changes.jsonl."""
    if not changes:
        return
    record = {"time": time.time(), "changes": {k: [_jsonable(a), _jsonable(b)] for k, (a, b) in changes.items()}}
    with open(os.path.join(run_dir, CHANGES_NAME), "a") as f:
        f.write(json.dumps(record) + "\n")


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value
