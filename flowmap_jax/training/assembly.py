"""The parts of a run, built from its configuration: teacher, flow map, objectives, data, samplers.

`build(config, mesh) -> Parts` is the one place where the trainer meets the flow-map core
(`spec`, `teacher`, `flow_map`, `samplers`, `objectives`), the UNet port and the export writer:

- Teacher: a diffusers folder (or hub id) `--teacher.path` with the UNet in `--teacher.subfolder`
  and `scheduler_config.json` in `--teacher.scheduler_subfolder`, found by `flowmap_jax.data.teacher_folder`
  and read by `flowmap_jax.unet.diffusers_io.load_diffusers_unet` (safetensors, no torch). The embedded
  digits teacher (`teacher_folder.EMBEDDED_DIGITS_TEACHER`) is just such a folder inside the package. An optional
  `label_embeddings.safetensors` ("weight" (K + 1, D), row K the null label) in the teacher folder
  turns class labels into `encoder_hidden_states` (B, 1, D) (the digits teacher's "text encoder").
  Guidance: classifier-free with the data's unconditional embedding (`dataset.uncond`), or
  autoguidance with `--teacher.weak_path` (a second folder of the same layout).
- Flow map: the teacher's UNet plus the target-time hook (`flow_map.add_target_time_hook`: class
  embedding with a zero last layer), so at step 0 the flow map is exactly the teacher's DDIM step.
  Guidance as an input (`--objective.options` with guidance_scale_range [lo, hi] and guidance_embedding_dim D):
  the student's config gains time_cond_proj_dim = D with a zero `time_embedding.cond_proj`
  (`flow_map.add_guidance_input`: at step 0 the student is the teacher at every w; the teacher keeps its own
  config); the objectives draw w ~ U(lo, hi) per example for the teacher's classifier-free guidance (on even at
  --teacher.guidance_scale 1) and feed the student timestep_cond = embedding(w - 1, D); grids and the quality
  table use w = --teacher.guidance_scale, the export's default.
- Objectives: `objectives.make_objective(name, flow_map, options)` for each `--objective.names`,
  summed with `--objective.weights` (`objectives.combine_objectives`); the batch also carries
  "step" (the optimiser step, for the tangent warm-up).
- Samplers: flow map with N jumps on `spec.time_grid.time_grid(schedule, N)` (uniform in teacher time
  from the noise end to the clean end); the teacher with DDIM on the same kind of grid.
- Grids of a latent teacher: decoded through the pipeline's VAE in PyTorch (`grid_decoder`), else shown as
  latents with a note.
- Export: the EMA weights through `flowmap_jax.training.export_writer.export_flow_map` (a stock diffusers UNet folder
  with the target-time hook, plus flowmap.json and the label embeddings), the same writer as
  `python -m conversion export RUN_DIR OUT`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from flowmap_jax.data.teacher_folder import (
    TeacherNotFound,
    label_table_file,
    load_schedule,
    resolve_teacher_path,
)


@dataclasses.dataclass
class Parts:
    """What `train.run` needs; every function is pure and jit-friendly where it touches arrays.

    params: initial flow-map network parameters (pytree of float32 arrays).
    teacher: the teacher as a pytree (its parameters are leaves: jit arguments, never constants).
    loss_fn: `(params, teacher, batch, rng) -> (loss, metrics)` (weighted sum of objectives).
    dataset: a `datasets.Dataset`.
    eval_inputs: `(n, seed) -> (noise (n, H, W, C) float32, cond dict of (n, ...) or None,
        labels (n,) int or None)`: fixed inputs of sample grids and the quality table.
    sample_flow: `(params, teacher, noise, cond, jumps: int) -> (n, H, W, C)` flow-map samples.
    sample_teacher: `(teacher, noise, cond, steps: int) -> (n, H, W, C)` teacher ODE samples.
    quality: `(samples, labels) -> dict of floats or None` (the digits metrics where they apply).
    export: `(params (numpy), folder, provenance dict) -> folder`, or None when not available.
    info: free-form description (teacher folder, UNet size...), logged and written to the run.
    decode: `(latents (n, h, w, C)) -> images (n, H, W, 3)` in [-1, 1] for the sample grids of a latent teacher
        (`grid_decoder`: the pipeline's VAE, in PyTorch), or None (pixels, or no VAE).
    notes: one-line warnings for the run's log (e.g. why grids show latents).
    base_fingerprint: a LoRA run's frozen base, {"sha256": `core.lora.base_fingerprint` of the teacher's weights
        as loaded, "source": their folder}; recorded in every checkpoint and compared on resume. None otherwise.

    A LoRA run (`--model.lora_rank R`): `params` is the trainable tree `{"adapters", "inputs"}` of
    `flowmap_jax.core.lora` (the adapters and the flow map's own inputs, nothing else), and loss_fn, sample_flow
    and export read the frozen base from the teacher they are given (`teacher.params`: one copy of the UNet).
    """

    params: Any
    teacher: Any
    loss_fn: Callable
    dataset: Any
    eval_inputs: Callable
    sample_flow: Callable
    sample_teacher: Callable
    quality: Callable
    export: Callable | None = None
    info: dict = dataclasses.field(default_factory=dict)
    decode: Callable | None = None
    notes: list = dataclasses.field(default_factory=list)
    base_fingerprint: dict | None = None


def in_compute_dtype(params, dtype):
    """The frozen teacher's weights in the compute dtype: floating leaves cast to `dtype` (numpy arrays; bf16
    through ml_dtypes), others unchanged. With float32 compute nothing changes. In bf16 the teacher's outputs
    move within bf16 rounding (the UNet casts each weight to bf16 at use; norms' and biases' float32 parts round
    once more): measured on the digits teacher, max |difference| 0.016 on outputs up to 4.1, half a bf16 ulp."""
    import jax
    import jax.numpy as jnp

    if jnp.dtype(dtype) == jnp.float32:
        return params
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
                        else x, params)


def load_teacher_unet(path: str, subfolder: str) -> tuple[dict, dict]:
    """(diffusers config dict, Flax params) of the UNet at path/subfolder; TeacherNotFound if absent."""
    from flowmap_jax.unet.diffusers_io import load_diffusers_unet

    local = os.path.isdir(path)
    if not local and (os.path.isabs(path) or path.startswith(".") or path.count("/") != 1):
        raise TeacherNotFound(f"--teacher.path: no teacher folder at {path}")
    try:
        return load_diffusers_unet(path, subfolder=subfolder or None)
    except (FileNotFoundError, OSError, ValueError) as error:  # ValueError: unsupported config, bad weights
        where = os.path.join(path, subfolder) if subfolder else path
        raise TeacherNotFound(f"--teacher.path: cannot load a diffusers UNet from {where}: {error}") from None


def build(config, mesh) -> Parts:
    """The parts of the run `config` (a `config.TrainConfig`) describes. `mesh` is unused here (the
    trainer places everything), kept so stand-ins can use it."""
    del mesh
    import jax
    import jax.numpy as jnp

    from flowmap_jax.data import datasets
    from flowmap_jax.core import flow_map, objectives, samplers
    from flowmap_jax.spec.time_grid import time_grid
    from flowmap_jax.core.teacher import Teacher, unet_teacher_fn
    from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig

    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    path = resolve_teacher_path(config.teacher.path)

    # Teacher: UNet, schedule, conditioning, guidance.
    unet_config, teacher_params = load_teacher_unet(path, config.teacher.subfolder)
    schedule, prediction_type = load_schedule(path, config.teacher.scheduler_subfolder)
    teacher_unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(unet_config), dtype=dtype, remat=config.model.remat)
    label_file = label_table_file(path)
    conditioner = datasets.LabelConditioner.from_file(label_file) if label_file else None
    dataset = datasets.make_dataset(config.data, conditioner)
    channels = int(unet_config.get("in_channels", 4))
    if config.data.sample_shape[-1] != channels:
        raise datasets.DataError(f"--data.sample_shape {tuple(config.data.sample_shape)} has {config.data.sample_shape[-1]} "
                                 f"channels but the teacher UNet takes in_channels={channels}")
    guidance_scale = float(config.teacher.guidance_scale)
    options = config.objective.options
    w_range, w_dim = options.guidance_scale_range, options.guidance_embedding_dim
    uncond, weak_kwargs = None, {}
    if config.teacher.weak_path:
        weak_config, weak_params = load_teacher_unet(resolve_teacher_path(config.teacher.weak_path),
                                                     config.teacher.subfolder)
        weak_unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(weak_config), dtype=dtype, remat=config.model.remat)
        weak_kwargs = {"weak_apply_fn": unet_teacher_fn(weak_unet),
                       "weak_params": in_compute_dtype(weak_params, dtype)}
    elif guidance_scale != 1.0 or w_range is not None:
        if dataset.uncond is None:
            what = (f"--teacher.guidance_scale {guidance_scale}" if w_range is None else
                    f"--objective.options guidance_scale_range {list(w_range)}")
            raise datasets.DataError(
                f"{what}: classifier-free guidance needs the unconditional "
                f"conditioning, and --data.source {config.data.source} provides none (label embeddings in the "
                f"teacher folder, or uncond.safetensors in the shards); use --teacher.guidance_scale 1")
        uncond = jax.tree.map(jnp.asarray, dataset.uncond)
    # The teacher is frozen: its weights are held in the compute dtype (half the memory in bf16; the UNet casts
    # them to it at every use anyway); the student's copy below stays float32 for the optimiser.
    teacher = Teacher.create(unet_teacher_fn(teacher_unet), in_compute_dtype(teacher_params, dtype), schedule,
                             prediction_type, guidance_scale=jnp.float32(guidance_scale), uncond=uncond,
                             **weak_kwargs)

    # Flow map: the teacher's UNet plus the zero-initialised target-time hook, and, with guidance distilled as an
    # input, the zero-initialised guidance input (time_cond_proj_dim; the teacher keeps its own config).
    flow_config, params = flow_map.add_target_time_hook(unet_config, teacher_params,
                                                        jax.random.key(config.run.seed))
    if w_dim is not None:
        try:
            flow_config, params = flow_map.add_guidance_input(flow_config, params, w_dim)
        except ValueError as error:
            from flowmap_jax.training.config import ConfigError

            raise ConfigError(f"--objective.options guidance_embedding_dim: {error}") from None
    params = jax.tree.map(np.asarray, params)
    lora_settings, base_fingerprint = None, None
    n_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))  # the flow-map UNet's
    if config.model.lora_rank > 0:
        params, lora_settings, base_fingerprint = _lora_trainable(config, params, teacher_params, path)
    student_unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(flow_config), dtype=dtype, remat=config.model.remat)
    fmap = flow_map.FlowMap(flow_map.unet_network(student_unet), schedule, prediction_type,
                            parameterization=config.model.parameterization)

    # Objectives.
    named = []
    for name, weight in zip(config.objective.names, config.objective.weights):
        try:
            named.append((name, float(weight), objectives.make_objective(name, fmap, options)))
        except (ValueError, TypeError) as error:
            from flowmap_jax.training.config import ConfigError

            raise ConfigError(f"--objective.names / --objective.options: {error}") from None
    loss_fn = objectives.combine_objectives(named)
    merged = None
    if lora_settings is not None:  # the student is the teacher's base plus the adapters, merged inside the step
        from flowmap_jax.core.lora import merge_params, on_merged_params

        loss_fn = on_merged_params(loss_fn, lora_settings.scale)
        # Outside the step (sample grids, the quality table) the merge is one compiled program too: op by op on
        # sharded arrays it is hundreds of small multi-device programs (and one aborted in XLA CPU under load).
        merged = jax.jit(lambda base, trainable: merge_params(base, trainable, lora_settings.scale))

    # Samplers. The flow map's N-jump sampler is `samplers.flow_map_sample` over one compiled jump with
    # traced times (`samplers.make_jump`), so 1, 2 and 4 jumps share one compilation.
    jump = samplers.make_jump(fmap)
    teacher_cache = {}

    def sample_flow(params, teacher, noise, cond, jumps):
        if merged is not None:
            params = merged(teacher.params, params)
        grid = time_grid(schedule, int(jumps), spacing=config.sample.spacing)
        if w_dim is not None:  # the guidance input at the teacher's own scale (the export's default w)
            w = jnp.full((noise.shape[0],), guidance_scale, jnp.float32)
            cond = flow_map.guidance_input_cond(cond, w, w_dim)
        return samplers.flow_map_sample(fmap, params, jnp.asarray(noise), grid, cond, jump=jump)

    def sample_teacher(teacher, noise, cond, steps):
        steps = int(steps)
        if steps not in teacher_cache:
            grid = time_grid(schedule, steps)
            teacher_cache[steps] = jax.jit(lambda tch, x, c: samplers.ddim_sample(tch, x, grid, cond=c))
        return teacher_cache[steps](teacher, noise, cond)

    sample_shape = tuple(config.data.sample_shape)

    def eval_inputs(n, seed):
        noise = np.random.default_rng(seed).standard_normal((n, *sample_shape)).astype(np.float32)
        if conditioner is not None:
            labels = np.arange(n) % conditioner.null_label
            return noise, conditioner(labels), labels
        if getattr(dataset, "cond_names", None):
            return noise, dataset.get(np.arange(n) % dataset.num_examples)["cond"], None
        return noise, None, None

    quality = _quality_function(config.data, conditioner)
    from flowmap_jax.training.grid_decoder import grid_decoder

    decode, grid_note = grid_decoder(config.teacher, config.data, channels)

    def export(params, folder, provenance):
        from flowmap_jax.training.export_writer import export_flow_map
        from flowmap_jax.training.run_provenance import (
            flow_map_config_from_train_config,
            run_provenance,
        )

        provenance = run_provenance(config, provenance.get("step"), weights="ema")
        if lora_settings is not None:
            from flowmap_jax.training.lora_export_writer import export_lora_flow_map

            return str(export_lora_flow_map(params, lora_settings, unet_config,
                                            flow_map_config_from_train_config(config), folder, provenance,
                                            base_fingerprint=base_fingerprint["sha256"]))
        return str(export_flow_map(params, flow_config, flow_map_config_from_train_config(config), folder,
                                   provenance))

    info = {"teacher": path, "unet_parameters": n_params, "schedule": schedule.kind,
            "prediction_type": prediction_type, "guidance": teacher.guidance, "examples": dataset.num_examples}
    if w_dim is not None:
        info["guidance_input"] = {"time_cond_proj_dim": w_dim, "scale_range": list(w_range),
                                  "default_scale": guidance_scale}
    if lora_settings is not None:
        from flowmap_jax.core.lora import num_adapters

        info["lora"] = {"rank": lora_settings.rank, "alpha": lora_settings.alpha,
                        "adapted_modules": num_adapters(params["adapters"]),
                        "trainable_parameters": sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))}
    if decode is not None:
        info["grid_vae"] = os.path.join(decode.folder, decode.subfolder)
    notes = [grid_note] if grid_note else []
    if lora_settings is not None and config.optim.lr < 1e-3:
        notes.append(f"LoRA rank {lora_settings.rank} at --optim.lr {config.optim.lr:g}: adapters usually want about "
                     "10x a full fine-tune's rate (digits teacher, 300 steps: rank 8 at 1e-3 matched the full run at "
                     "1e-4; at 1e-4 its 1-jump MSE was 5x worse)")
    return Parts(params=params, teacher=teacher, loss_fn=loss_fn, dataset=dataset, eval_inputs=eval_inputs,
                 sample_flow=sample_flow, sample_teacher=sample_teacher, quality=quality, export=export, info=info,
                 decode=decode, notes=notes, base_fingerprint=base_fingerprint)


def _lora_trainable(config, student_params, teacher_params, teacher_path):
    """(trainable tree, LoraSettings, base fingerprint dict) of a LoRA run: adapters on the teacher's UNet (the
    base) and the flow map's own inputs taken from `student_params` (the base plus the hooks)."""
    import jax

    from flowmap_jax.core import lora

    try:
        settings = lora.LoraSettings.create(config.model.lora_rank, config.model.lora_alpha, config.model.lora_targets)
        trainable = lora.init_trainable(student_params, teacher_params, settings,
                                        jax.random.fold_in(jax.random.key(config.run.seed), 0x10A))
    except ValueError as error:
        from flowmap_jax.training.config import ConfigError

        raise ConfigError(f"--model.lora_targets / --model.lora_rank: {error}") from None
    where = os.path.join(teacher_path, config.teacher.subfolder) if config.teacher.subfolder else teacher_path
    fingerprint = {"sha256": lora.base_fingerprint(teacher_params), "source": where}
    return jax.tree.map(np.asarray, trainable), settings, fingerprint



def _quality_function(data, conditioner):
    """The digits quality report where the data (`config.DataConfig`) are the digits, else a no-op."""
    if data.source != "digits" or tuple(data.sample_shape) != (16, 16, 1):
        return lambda samples, labels: None
    try:
        from flowmap_jax.digits.quality import digits_quality_report
    except ImportError:  # the digits quality metrics are not available in this checkout
        return lambda samples, labels: None

    def quality(samples, labels):
        report = digits_quality_report(np.asarray(samples), None if labels is None else np.asarray(labels))
        return {k: float(v) for k, v in dict(report).items() if isinstance(v, (int, float, np.floating))}

    return quality
