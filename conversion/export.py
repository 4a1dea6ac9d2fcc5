"""Export a trained flow map for PyTorch/diffusers, and import it back into JAX.

    python -m conversion export runs/digits runs/digits/export              # newest checkpoint, EMA weights
    python -m conversion export runs/digits/checkpoints/400 out --weights params
    python -m conversion export OLD_EXPORT NEW_EXPORT                        # re-export a flow-map folder

The folder format is `flowmap_jax.export_format` (a stock diffusers UNet2DConditionModel with
class_embed_type="timestep", safetensors, plus flowmap.json). API:

- `export_flow_map(params, unet_config, flow_map_config, out_dir, provenance)`: Flax params (nested dict of
  arrays, as trained) -> folder. Written into a temporary sibling folder and renamed into place: a failed
  export never leaves a half folder where a good one was (an existing export at `out_dir` is replaced only
  once the new one is complete).
- `export_checkpoint(source, out_dir, weights="ema")`: a run folder, its checkpoints folder, one step's
  folder (`.../checkpoints/400`) or an existing export -> folder. The flow map's UNet config, schedule,
  guidance and label embeddings come from the run's `config.json` (its teacher folder); `teacher=...`
  overrides the teacher folder for a checkpoint without its run folder.
- `load_flow_map_export(folder) -> FlowMapExport` (params, unet_config, config, metadata): to continue
  training, to use as a teacher/initialisation, or to sample (`jax_flow_map`).
- `read_checkpoint_params(source, weights)`: only the EMA (or raw) parameters of an Orbax checkpoint
  (partial restore: the optimiser state is not read), checked against the checkpoint's fingerprint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from conversion.diffusers_io import atomic_write_bytes, read_state_dict, save_state_dict
from conversion.state_dict import flax_to_state_dict, state_dict_to_flax
from flowmap_jax import __version__
from flowmap_jax.export_format import (
    FLOWMAP_JSON,
    LABEL_EMBEDDINGS_NAME,
    UNET_CONFIG_NAME,
    ExportFormatError,
    FlowMapConfig,
    check_unet_hooks,
    flow_map_metadata,
    is_export,
    read_export,
    read_label_embeddings,
)
from flowmap_jax.flow_config import add_target_time_hook_config, load_scheduler, read_scheduler_config
from flowmap_jax.unet import UNetConfig

__all__ = ["FlowMapExport", "CheckpointParams", "export_flow_map", "export_checkpoint", "load_flow_map_export",
           "jax_flow_map", "read_checkpoint_params", "flow_map_config_from_train_config",
           "student_unet_config", "run_provenance", "CheckpointError"]

WEIGHT_CHOICES = ("ema", "params")


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported (unreadable, corrupted, no such step); names the folder."""


# --------------------------------------------------------------------------------------------------
# Export.

def _write_folder_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Runs `write(tmp)` on a fresh temporary sibling of `out_dir`, then renames it into place.

    An existing `out_dir` is replaced only after `write` succeeded (moved aside, the new folder renamed in,
    the old one deleted); any failure removes the temporary folder and leaves `out_dir` as it was. Refuses
    to replace a non-empty folder that is not a flow-map export.
    """
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export(out_dir):
        raise ValueError(f"refusing to replace {out_dir}: it is not empty and not a flow-map export "
                              f"(no {FLOWMAP_JSON}); choose another output folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp/mkstemp create private (0700/0600) entries
        for entry in tmp.iterdir():
            os.chmod(entry, 0o666 & ~umask)
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


def _as_unet_config(unet_config) -> UNetConfig:
    if isinstance(unet_config, UNetConfig):
        return unet_config
    try:
        return UNetConfig.from_dict(dict(unet_config))
    except ValueError as err:
        raise ValueError(f"unet_config: {err}") from None


def export_flow_map(params, unet_config, flow_map_config: FlowMapConfig, out_dir, provenance: dict | None = None,
                    *, exported_at: str | None = None) -> Path:
    """Writes a flow map as a diffusers folder that `UNet2DConditionModel.from_pretrained` loads, plus
    flowmap.json (and label_embeddings.safetensors when `flow_map_config.label_embeddings` is set).

    params: the flow-map UNet's Flax parameters (nested dict of numpy or jax arrays, e.g. a TrainState's
        `ema_params` on host), stored in their own dtype (float32 from training).
    unet_config: the flow-map UNet's diffusers config (dict or UNetConfig) with class_embed_type="timestep"
        (`flow_config.add_target_time_hook_config` of the teacher's) and time_cond_proj_dim where the guidance
        scale is an input.
    flow_map_config: schedule, prediction type, guidance, conditioning (`export_format.FlowMapConfig`).
    provenance: free-form JSON-able dict (teacher, objectives, steps, ...; `run_provenance` builds the
        trainer's); "date" (of this export: UTC, ISO 8601, or `exported_at`) and "flowmap_jax_version" are
        set.
    Returns the folder (absolute). Atomic: see `_write_folder_atomically`.
    """
    if not isinstance(flow_map_config, FlowMapConfig):
        raise TypeError(f"flow_map_config must be an export_format.FlowMapConfig, got {type(flow_map_config).__name__}")
    config = _as_unet_config(unet_config)
    config_dict = config.to_dict()
    check_unet_hooks(config_dict, flow_map_config, "unet_config")
    state = flax_to_state_dict(params, config)  # checks every key and shape against the config
    label_bytes, label_info = None, None
    if flow_map_config.label_embeddings is not None:
        label_path = Path(flow_map_config.label_embeddings)
        table = read_label_embeddings(label_path)
        label_bytes = label_path.read_bytes()
        label_info = {"num_labels": int(table.shape[0] - 1), "null_label": int(table.shape[0] - 1),
                      "label_embedding_dim": int(table.shape[1]),
                      "labels_to_encoder_hidden_states": "weight[labels][:, None, :] -> (B, 1, D); row K (the "
                                                         "null label) is the unconditional embedding"}
    provenance = dict(provenance or {})
    provenance["date"] = exported_at or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    provenance["flowmap_jax_version"] = __version__
    meta = flow_map_metadata(flow_map_config, config_dict, provenance, label_info, version=__version__)
    meta_bytes = (json.dumps(meta, indent=2, sort_keys=False, default=str) + "\n").encode()

    def write(folder: Path):
        save_state_dict(state, config_dict, folder)
        if label_bytes is not None:
            atomic_write_bytes(folder / LABEL_EMBEDDINGS_NAME, label_bytes)
        atomic_write_bytes(folder / FLOWMAP_JSON, meta_bytes)

    return _write_folder_atomically(Path(out_dir), write)


# --------------------------------------------------------------------------------------------------
# Import back into JAX.

@dataclasses.dataclass
class FlowMapExport:
    """An exported flow map read back for JAX.

    params: Flax parameters (nested dict of numpy arrays, float32 as stored unless a dtype was asked),
        to continue training or to sample; unet_config: the diffusers config dict; config: schedule,
        prediction type, guidance, conditioning; metadata: flowmap.json as read (provenance included).
    """

    folder: Path
    params: dict
    unet_config: dict
    config: FlowMapConfig
    metadata: dict

    @property
    def provenance(self) -> dict:
        return dict(self.metadata.get("provenance") or {})

    def label_table(self) -> np.ndarray | None:
        """(K + 1, D) float32 label embeddings (row K the null label), or None."""
        return None if self.config.label_embeddings is None else read_label_embeddings(self.config.label_embeddings)


def load_flow_map_export(folder, dtype=None) -> FlowMapExport:
    """Reads an exported flow map into JAX-ready numpy params. `dtype` (e.g. np.float32) casts the weights;
    None keeps them as stored (bit-exact re-export). Raises ExportFormatError / FileNotFoundError /
    ConversionError naming the file and key when the folder is not a valid flow-map export."""
    info = read_export(folder)
    try:
        config = UNetConfig.from_dict(info.unet_config)
    except ValueError as err:
        raise ExportFormatError(f"{info.folder / UNET_CONFIG_NAME}: {err}") from None
    state = read_state_dict(info.folder)
    params = state_dict_to_flax(state, config, dtype=dtype, source=f"weights in {info.folder}")
    return FlowMapExport(folder=info.folder, params=params, unet_config=info.unet_config, config=info.config,
                         metadata=info.metadata)


def jax_flow_map(exported: FlowMapExport, dtype=None, jit: bool = True):
    """A `flowmap_jax.flow_map.FlowMap` over the exported UNet (Flax port, compute dtype `dtype`, default
    float32; parameters stay as stored). The network is jitted once per input shape (`jit=False` for
    use inside an enclosing jit). Call it as flow_map(params, x (B, H, W, C), s, t, cond)."""
    import jax
    import jax.numpy as jnp

    from flowmap_jax.flow_map import FlowMap, unet_network
    from flowmap_jax.unet import FlaxUNet2DConditionModel

    unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(exported.unet_config), dtype=dtype or jnp.float32)
    net = unet_network(unet)
    return FlowMap(net=jax.jit(net) if jit else net, schedule=exported.config.schedule,
                   prediction_type=exported.config.prediction_type)


# --------------------------------------------------------------------------------------------------
# Orbax checkpoints of a run.

@dataclasses.dataclass
class CheckpointParams:
    """Parameters read from one checkpoint: params (nested dict of numpy float32), which ("ema" or
    "params"), step, the checkpoint's folder, its meta JSON, and the run folder (or None)."""

    params: dict
    weights: str
    step: int
    directory: Path
    meta: dict
    run_dir: Path | None


def _checkpoint_steps(directory: Path) -> list[int]:
    """Finished steps under a checkpoints folder (Orbax's in-progress `*.orbax-checkpoint-tmp-*` excluded)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / "state").is_dir())


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _restore_weights(step_dir: Path, weights: str) -> tuple[dict, dict]:
    """(params, meta) of `weights` from one step folder, fingerprint-checked."""
    import jax
    import orbax.checkpoint as ocp

    meta_path = step_dir / "meta" / "metadata"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read the checkpoint metadata {meta_path}: {err}") from None
    state_dir = step_dir / "state"
    name = "ema_params" if weights == "ema" else "params"
    with _quiet_absl():
        checkpointer = ocp.PyTreeCheckpointer()
        try:
            tree = checkpointer.metadata(state_dir).item_metadata.tree
            subtree = tree["train_state"][name]
        except Exception as err:  # noqa: BLE001 - unreadable, or not a training checkpoint
            raise CheckpointError(f"{state_dir} is not a readable training checkpoint (no train_state/{name}): "
                                  f"{type(err).__name__}: {err}") from None
        item = {"train_state": {name: subtree}}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"cannot restore train_state/{name} from {state_dir}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from None
    params = restored["train_state"][name]
    # The checkpoint's fingerprint: (sum, sum of squares) per leaf of TrainState(step, params, ema_params, ...).
    leaves = jax.tree_util.tree_leaves_with_path(params)
    n = len(leaves)
    offset = 2 * (1 + (n if weights == "ema" else 0))
    saved = list(meta.get("fingerprint") or [])
    if len(saved) < 2 * (1 + 2 * n):
        raise CheckpointError(f"{meta_path}: its fingerprint has {len(saved)} values, too few for "
                              f"{n} parameter arrays (not a checkpoint of this flow map?)")
    bad = [jax.tree_util.keystr(path) for i, (path, leaf) in enumerate(leaves)
           if not _leaf_matches_fingerprint(leaf, saved[offset + 2 * i], saved[offset + 2 * i + 1])]
    if bad:
        raise CheckpointError(f"{state_dir}: the {name} arrays {bad[:5]}{' ...' if len(bad) > 5 else ''} do not "
                              "match the fingerprint written with them (a corrupted checkpoint)")
    return jax.tree.map(np.asarray, params), meta


def _leaf_matches_fingerprint(leaf, saved_sum: float, saved_sumsq: float) -> bool:
    """Compares one array with the (sum, sum of squares) the trainer saved (`checkpointing.fingerprint`,
    float32 reductions on whatever device trained). Ours are float64, so the tolerance covers float32
    accumulation error, which grows with the size n: |sum| within 1e-4 relative plus 1e-5 * sqrt(n * sumsq)
    (about 100 float32 epsilons times n * rms), the sum of squares within 1e-3 relative. A corrupted
    block of more than about 1e-3 of an array's entries (or any non-finite value) fails."""
    x = np.asarray(leaf, np.float64)
    total, sumsq = float(x.sum()), float(np.square(x).sum())
    if not (np.isfinite(total) and np.isfinite(sumsq)):
        return False
    ok_sum = abs(saved_sum - total) <= 1e-4 * abs(total) + 1e-5 * np.sqrt(x.size * sumsq) + 1e-6
    ok_sumsq = abs(saved_sumsq - sumsq) <= 1e-3 * sumsq + 1e-6
    return bool(ok_sum and ok_sumsq)


def read_checkpoint_params(source, weights: str = "ema", step: int | None = None,
                           say: Callable[[str], Any] = print) -> CheckpointParams:
    """The EMA (`weights="ema"`, default) or raw (`"params"`) flow-map parameters of a training checkpoint.

    source: a run folder (with checkpoints/), a checkpoints folder, or one step's folder
    (`.../checkpoints/400`). `step`: that step; default the newest, falling back to older ones (reported
    through `say`) when the newest is unreadable or corrupted, like the trainer's resume.
    """
    from flowmap_jax import checkpointing

    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    try:
        directory, found_step = checkpointing.find_checkpoint_dir(os.fspath(source))
    except FileNotFoundError:
        raise FileNotFoundError(f"no run or checkpoint folder at {source}") from None
    directory = Path(directory)
    step = found_step if step is None else int(step)
    steps = _checkpoint_steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory} (expected step folders like {directory}/400 with "
                              "state/ and meta/)")
    if step is not None and step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}; steps found: {steps}")
    candidates = [step] if step is not None else list(reversed(steps))
    failures = []
    for candidate in candidates:
        try:
            params, meta = _restore_weights(directory / str(candidate), weights)
        except CheckpointError as err:
            failures.append(str(err))
            if step is None and candidate != candidates[-1]:
                say(f"checkpoint at step {candidate} is unusable ({err}); falling back to an older one")
            continue
        run_dir = directory.parent if (directory.parent / "config.json").is_file() else None
        return CheckpointParams(params=params, weights=weights, step=int(meta.get("step", candidate)),
                                directory=directory / str(candidate), meta=meta, run_dir=run_dir)
    raise CheckpointError("; ".join(failures))


# --------------------------------------------------------------------------------------------------
# What a training run's config says about its flow map.

def _train_config(config):
    from flowmap_jax import presets

    if isinstance(config, presets.TrainConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the run config {path}: {err}") from None
        try:
            return presets.TrainConfig.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from None
    return presets.TrainConfig.from_dict(dict(config))


def resolve_teacher_folder(path: str) -> str:
    """The trainer's teacher path: `presets.EMBEDDED_DIGITS_TEACHER` -> the package's digits teacher folder;
    anything else (a folder or a hub id) unchanged."""
    import flowmap_jax
    from flowmap_jax.presets import EMBEDDED_DIGITS_TEACHER

    if path == EMBEDDED_DIGITS_TEACHER:
        return str(Path(flowmap_jax.__file__).resolve().parent / "assets" / "digits_teacher")
    return path


def _teacher_file(path: str, subfolder: str, filename: str, flag: str) -> Path:
    """A file of the teacher: local folder, or one file of a hub repo (no weights downloaded)."""
    local = Path(path) / subfolder / filename if subfolder else Path(path) / filename
    if Path(path).is_dir():
        if not local.is_file():
            raise FileNotFoundError(f"{flag}: no {filename} in {local.parent}")
        return local
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise FileNotFoundError(f"{flag}: no teacher folder at {path}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path, filename, subfolder=subfolder or None))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo
        raise FileNotFoundError(f"{flag}: cannot fetch {filename} of hub id {path!r}: {err}") from None


def student_unet_config(teacher_unet_config: dict, params=None) -> dict:
    """The flow-map UNet's diffusers config: the teacher's plus the target-time hook; time_cond_proj_dim
    taken from `params` (time_embedding/cond_proj) when the trained network has a guidance input the
    teacher's config lacks."""
    config = add_target_time_hook_config(dict(teacher_unet_config))
    if params is not None and config.get("time_cond_proj_dim") is None:
        cond_proj = params.get("time_embedding", {}).get("cond_proj")
        if cond_proj is not None:
            config["time_cond_proj_dim"] = int(np.shape(cond_proj["kernel"])[0])
    return config


def flow_map_config_from_train_config(config, teacher: str | None = None, guidance_embedding_dim=None
                                      ) -> FlowMapConfig:
    """The FlowMapConfig of a run: `config` a `presets.TrainConfig`, its dict, or its config.json path.

    Reads the teacher's scheduler_config.json (full, recorded) and finds label_embeddings.safetensors in
    the teacher folder (`teacher` overrides `config.teacher.path`). Guidance: autoguidance when
    `teacher.weak_path` is set, classifier-free when `teacher.guidance_scale` != 1, at that scale, baked in
    unless the objective options set `guidance_embedding_dim` (or `guidance_embedding_dim` is given).
    """
    config = _train_config(config)
    path = resolve_teacher_folder(teacher or config.teacher.path)
    scheduler_config = read_scheduler_config(
        _teacher_file(path, config.teacher.scheduler_subfolder, "scheduler_config.json",
                      "--teacher.scheduler_subfolder"))
    try:
        schedule, prediction_type = load_scheduler(scheduler_config)
    except ValueError as err:
        raise ValueError(f"the teacher's scheduler_config.json ({path}): {err}") from None
    try:
        options = json.loads(config.objective.options or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"--objective.options is not valid JSON: {err}") from None
    embedding_dim = guidance_embedding_dim or options.get("guidance_embedding_dim")
    scale = float(config.teacher.guidance_scale)
    guidance = "autoguidance" if config.teacher.weak_path else ("cfg" if scale != 1.0 else "none")
    labels = Path(path) / LABEL_EMBEDDINGS_NAME
    return FlowMapConfig(
        schedule=schedule, prediction_type=prediction_type, scheduler_config=scheduler_config, guidance=guidance,
        guidance_scale=scale, guidance_embedding_dim=embedding_dim,
        guidance_scale_range=options.get("guidance_scale_range") if embedding_dim else None,
        label_embeddings=str(labels) if labels.is_file() else None,
        sample_shape=tuple(config.data.sample_shape))


def run_provenance(config, step: int | None = None, **extra) -> dict:
    """Provenance of a run for flowmap.json: teacher, objectives (names, weights, options), steps, seed,
    EMA decay, preset and the whole training config; `extra` (e.g. checkpoint=..., weights="ema") added."""
    config = _train_config(config)
    try:
        options = json.loads(config.objective.options or "{}")
    except json.JSONDecodeError:
        options = config.objective.options
    return dict({
        "teacher": {"path": config.teacher.path, "subfolder": config.teacher.subfolder,
                    "scheduler_subfolder": config.teacher.scheduler_subfolder,
                    "guidance_scale": config.teacher.guidance_scale, "weak_path": config.teacher.weak_path or None},
        "objectives": [{"name": n, "weight": float(w)}
                       for n, w in zip(config.objective.names, config.objective.weights)],
        "objective_options": options,
        "step": step,
        "total_steps": config.run.steps,
        "seed": config.run.seed,
        "ema_decay": config.optim.ema_decay,
        "preset": config.preset,
        "train_config": config.to_dict(),
    }, **extra)


# --------------------------------------------------------------------------------------------------
# The command's entry point.

def export_checkpoint(source, out_dir, weights: str = "ema", step: int | None = None, teacher: str | None = None,
                      run_config=None, say: Callable[[str], Any] = print) -> Path:
    """A run folder / checkpoint (or an existing flow-map export) -> an exported flow map at `out_dir`.

    weights: "ema" (default) or "params". step: a checkpoint step (default the newest good one).
    teacher: the teacher folder (default the run config's teacher.path). run_config: the run's
    config.json (default `<run>/config.json` next to the checkpoints folder).
    """
    source = Path(source)
    if is_export(source):
        exported = load_flow_map_export(source)
        return export_flow_map(exported.params, exported.unet_config, exported.config, out_dir,
                               dict(exported.provenance, reexported_from=str(source.resolve())))
    loaded = read_checkpoint_params(source, weights, step, say=say)
    config_path = Path(run_config) if run_config else (loaded.run_dir / "config.json" if loaded.run_dir else None)
    if config_path is None:
        raise FileNotFoundError(f"no run config.json next to {loaded.directory.parent}: pass the run's config.json "
                                "(--run-config) so the teacher, schedule and objectives are known")
    config = _train_config(config_path)
    path = resolve_teacher_folder(teacher or config.teacher.path)
    teacher_unet = json.loads(_teacher_file(path, config.teacher.subfolder, "config.json",
                                            "--teacher.subfolder").read_text())
    unet_config = student_unet_config(teacher_unet, loaded.params)
    flow_map_config = flow_map_config_from_train_config(config, teacher=path)
    provenance = run_provenance(config, loaded.step, weights=weights, checkpoint=str(loaded.directory),
                                checkpoint_time=loaded.meta.get("time"))
    folder = export_flow_map(loaded.params, unet_config, flow_map_config, out_dir, provenance)
    say(f"exported step {loaded.step} ({weights} weights) of {loaded.directory.parent} to {folder}")
    return folder
