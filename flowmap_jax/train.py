"""Distil a diffusion teacher into a few-step flow map: `python -m flowmap_jax.train`.

    python -m flowmap_jax.train                  # embedded digits teacher, CPU, a few minutes
    python -m flowmap_jax.train --help           # every field of the configuration
    python -m flowmap_jax.train --preset sd15 --teacher.path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data.source shards --data.path /data/shards      # 8 GPUs: data parallel over all of them
    COORDINATOR_ADDRESS=host0:1234 NUM_PROCESSES=2 PROCESS_ID=$RANK python -m flowmap_jax.train ...

The story of a run, top to bottom in `run`:
  1. processes and devices: `jax.distributed` when asked, a (data, fsdp) mesh over every device;
  2. the run folder (`run_folder`): locked for this run, its config.json kept and compared on resume;
     checkpoints/, samples/, tensorboard/, metrics.jsonl;
  3. the parts (`assembly.build`): teacher loaded from a diffusers folder and converted, the flow
     map initialised from it, the objectives, the data, the samplers;
  4. optimiser, sharded train state and the compiled step;
  5. resume: newest good checkpoint of this run (or `--resume PATH`), data position included;
  6. a baseline: the untrained flow map (teacher weights read in the map's own parameterisation) with 1, 2, 4 jumps against the
     teacher's 50-step ODE solution from the same noise, and its quality numbers;
  7. the loop: one jitted step per batch, NaN check, scalars, sample grids, checkpoints, SIGTERM;
  8. the end: last checkpoint, sample grid (a latent teacher's decoded through its pipeline's VAE,
     `grid_decoder`), quality table, the flow map exported as a diffusers folder, and finished.json (a rerun
     of a finished run does nothing).

Exit codes (`flowmap_jax.cli.cli_exit`): 0 done (or saved and stopped on SIGTERM); 1 the run failed while
running (NaN loss, disk full while writing a checkpoint, no readable checkpoint, the run folder in use by
another run); 2 bad flags or bad input (an unknown flag or choice; --run.dir a file, or a folder of files that
are not a run's; a missing or unusable teacher or data; a mesh or a batch the devices cannot split; a resume
whose configuration differs from the run's; the "jax" extra not installed).
Either way one line `error: ...` on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from flowmap_jax.cli import cli_exit
from flowmap_jax.spec import image_grid

try:
    import jax

    from flowmap_jax.data import datasets
    from flowmap_jax.training import (
        checkpointing,
        distributed,
        reporting,
        run_folder,
        train_cli,
    )
    from flowmap_jax.training import sharding as sh
    from flowmap_jax.training import train_step as ts
    from flowmap_jax.training.config import TrainConfig
except ModuleNotFoundError as missing:  # `pip install "flowmap-jax[torch]"` alone: one line and exit 2, no traceback
    cli_exit.exit_if_missing_extra(missing, __name__)
    raise


class NonFiniteLoss(cli_exit.RunFailure, RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message names the step."""


class RunError(cli_exit.BadInput, RuntimeError):
    """A run that cannot start as asked: a batch the mesh cannot split, a resume that finds nothing."""


@dataclasses.dataclass
class RunResult:
    """What `run` returns: the final state (device arrays), the folder and what happened."""

    state: ts.TrainState
    run_dir: str
    status: str  # "done", "preempted"
    step: int
    quality: list | None = None


def run(config: TrainConfig, build: Callable | None = None) -> RunResult:
    """One training run as `config` describes. `build(config, mesh) -> assembly.Parts` makes the
    teacher, flow map, objectives, data and samplers (default `assembly.build`; tests pass stand-ins)."""
    # 1. Processes and devices (and the persistent compilation cache: a rerun skips compiling).
    t_start = time.perf_counter()
    _use_compilation_cache(config.run.compilation_cache)
    process = distributed.initialize(config.distributed)
    mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp)
    if config.data.batch_size % sh.num_batch_shards(mesh):
        raise RunError(f"--data.batch_size {config.data.batch_size} is not divisible by the "
                       f"{sh.num_batch_shards(mesh)} devices of the mesh")
    per_device = config.data.batch_size // sh.num_batch_shards(mesh)
    try:
        microbatches = ts.microbatch_count(per_device, config.optim.microbatch_size)
    except ValueError as error:
        raise RunError(f"{error} (--data.batch_size {config.data.batch_size} over {sh.num_batch_shards(mesh)} "
                       f"devices)") from None
    folder = run_folder.RunFolder.open(config.run, config.to_dict(), process.is_main)  # checked, locked, config compared
    run_dir = folder.path
    distributed.sync("run folder")
    try:  # a start that fails before training removes the run folder it created
        # 2.-3. The parts: teacher, flow map, objectives, data, samplers.
        if build is None:
            from flowmap_jax.training import assembly

            build = assembly.build
        parts = build(config, mesh)

        # 4. Optimiser, state, step.
        optimizer = ts.make_optimizer(config.optim, config.run.steps)
        specs = sh.param_specs(parts.params, mesh, config.mesh.fsdp_min_size)
        state_sharding = ts.state_shardings(parts.params, optimizer, mesh, specs)
        state = ts.init_state(sh.put_replicated(mesh, parts.params), optimizer, mesh, specs)
        # The frozen teacher: split over the fsdp axis like the student (replicated without FSDP).
        teacher_specs = sh.param_specs(parts.teacher, mesh, config.mesh.fsdp_min_size)
        teacher = sh.put_with_specs(mesh, parts.teacher, teacher_specs)
        rng = jax.jit(lambda: jax.random.key(config.run.seed), out_shardings=sh.replicated(mesh))()
        train_step = ts.make_train_step(parts.loss_fn, optimizer, mesh, specs, ema_decay=config.optim.ema_decay,
                                        state_sharding=state_sharding, teacher_specs=teacher_specs,
                                        microbatches=microbatches)

        # 5. Resume.
        reporter_say = (lambda text: print(text, file=sys.stderr, flush=True)) if process.is_main else (lambda _: None)
        checkpointer = checkpointing.Checkpointer(os.path.join(run_dir, "checkpoints"), keep=config.run.keep_checkpoints,
                                                  async_save=config.run.async_checkpoints)
        state, rng, data_position, history = _resume(config.run.resume, checkpointer, state, rng, state_sharding,
                                                      reporter_say)
        _check_lora_base(getattr(parts, "base_fingerprint", None), history, checkpointer)
        start_step = int(jax.device_get(state.step))

        stream = datasets.BatchStream(parts.dataset, config.data.batch_size, config.run.seed,
                                      process.index, process.count, position=data_position)
        batches = datasets.Prefetcher(stream, depth=2)
        finished_before = start_step >= config.run.steps and os.path.exists(os.path.join(run_dir, "finished.json"))
        reporter = reporting.Reporter(run_dir, config.run.steps, start_step, enabled=process.is_main,
                                      progress_bar=config.run.progress_bar, files=not finished_before)
        reporter.message(f"run folder {run_dir}: {jax.device_count()} device(s) ({jax.devices()[0].platform}) in "
                         f"{process.count} process(es), mesh {dict(mesh.shape)}, global batch {config.data.batch_size}, "
                         f"steps {start_step} -> {config.run.steps}; {json.dumps(parts.info, default=str)}")
        for note in folder.notes:
            reporter.message(note)
        for note in getattr(parts, "notes", None) or []:
            reporter.message(f"warning: {note}")

        # 6. Baseline: the untrained flow map against the teacher (fresh runs; kept in checkpoints).
        evaluator = _Evaluator(config.sample, parts, mesh, teacher, run_dir, reporter,
                               n=max(config.run.quality_samples, config.sample.grid_columns), seed=config.run.seed + 1,
                               guidance_scale=config.teacher.guidance_scale)
        if start_step == 0 and "baseline" not in history and config.run.quality_samples > 0:
            history["baseline"] = evaluator.flow_rows(state.ema_params, "untrained")
            reporter.message("untrained flow map (teacher weights in the map's parameterisation), MSE to the teacher's "
                             f"{config.sample.teacher_steps}-step solution: "
                             + ", ".join(f"{r['sampler']}: {r['mse_to_teacher']:.5f}" for r in history["baseline"]))
    except BaseException:
        folder.abandon()
        raise

    # 7. The loop.
    guard = checkpointing.PreemptionGuard()
    status = "done"
    pending = None  # (step, metrics) of the last step, checked one step late (no pipeline stall)
    schedule = ts.learning_rate_schedule(config.optim.lr, config.optim.warmup_steps, config.run.steps,
                                         config.optim.schedule)
    last_saved = start_step
    t_loop = time.perf_counter()
    try:
        for step in range(start_step + 1, config.run.steps + 1):
            guard.check_interrupt()  # a Ctrl-C whose KeyboardInterrupt was swallowed (PreemptionGuard)
            batch = sh.put_batch(mesh, _require_shape(batches.next(), config.data.sample_shape, step))
            state, metrics = train_step(state, teacher, batch, rng)
            if step == start_step + 1:
                jax.block_until_ready(metrics)
                reporter.message(f"first step (compiling the train step) took {time.perf_counter() - t_loop:.1f}s")
            _check_finite(pending, last_saved, checkpointer)
            pending = (step, metrics)
            reporter.step()
            if step % config.run.log_every == 0 or step == config.run.steps:
                _check_finite(pending, last_saved, checkpointer)
                reporter.scalars(step, jax.device_get(metrics), {"lr": float(schedule(step - 1))})
            if config.run.sample_every and step % config.run.sample_every == 0 and step < config.run.steps:
                evaluator.grid(state.ema_params, step)
            preempted = guard.reached(step)
            if step % config.run.checkpoint_every == 0 or preempted or step == config.run.steps:
                _check_finite(pending, last_saved, checkpointer)
                checkpointer.save(state, rng, batches.position, extra=history, wait=preempted)
                last_saved = step
            if preempted:
                reporter.message(f"{guard.signal_name or 'preemption'}: saved the checkpoint at step {step} in "
                                 f"{checkpointer.directory}; resume with the same command")
                status = "preempted"
                break
        _check_finite(pending, last_saved, checkpointer)
        checkpointer.wait()  # the last checkpoint is on disk before the run is called finished
        guard.check_interrupt()
    except BaseException:
        reporter.close()
        checkpointer.close()
        folder.close()
        raise
    finally:
        guard.close()
        batches.close()

    # 8. The end: grid, quality table, export (skipped when stopped early).
    step = int(jax.device_get(state.step))
    quality = None
    finished_marker = os.path.join(run_dir, "finished.json")
    if status == "done" and (start_step < config.run.steps or not os.path.exists(finished_marker)):
        evaluator.grid(state.ema_params, step)
        if config.run.quality_samples > 0:
            quality = evaluator.quality_table(state.ema_params, history, step)
        if config.run.export and parts.export is not None:
            ema_host = _to_host(state.ema_params)
            if process.is_main:
                exported = parts.export(ema_host, os.path.join(run_dir, "export"),
                                        {"step": step, "config": config.to_dict()})
                reporter.message(f"exported the flow map (EMA weights) to {exported}")
        if process.is_main:
            with open(finished_marker, "w") as f:
                json.dump({"step": step, "time": time.time(), "info": parts.info}, f, indent=2, default=str)
    elif status == "done":
        reporter.message(f"the run in {run_dir} is already finished at step {step} (finished.json); "
                         f"raise --run.steps to train on")
    reporter.message(f"{status} at step {step} in {time.perf_counter() - t_start:.0f}s; run folder {run_dir}")
    reporter.close()
    checkpointer.close()
    folder.close()
    distributed.sync("end of run")
    return RunResult(state=state, run_dir=run_dir, status=status, step=step, quality=quality)


# --------------------------------------------------------------------------------------------------
# Helpers of the story above.

def _use_compilation_cache(setting: str) -> None:
    """Persist compiled programs across runs: "auto" uses $JAX_COMPILATION_CACHE_DIR if set, else
    ~/.cache/flowmap_jax/xla (or $XDG_CACHE_HOME/flowmap_jax/xla); "" leaves JAX's default (off)."""
    if not setting:
        return
    if setting == "auto":
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return  # JAX reads it itself
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        setting = os.path.join(base, "flowmap_jax", "xla")
    try:
        os.makedirs(setting, exist_ok=True)
    except OSError:
        return  # a read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", setting)


def _to_host(tree):
    """Global arrays (possibly sharded over processes) -> numpy on every process."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _check_lora_base(fingerprint: dict | None, history: dict, checkpointer) -> None:
    """A LoRA run's checkpoints hold only what trains, plus the fingerprint of the frozen base (`history`, the
    checkpoint's extra record, key "lora_base"). A resume whose teacher weights differ is refused, naming both
    folders; a fresh run records the fingerprint."""
    if fingerprint is None:
        return
    saved = history.get("lora_base")
    if saved and saved.get("sha256") != fingerprint["sha256"]:
        raise RunError(f"--teacher.path: the base UNet weights in {fingerprint['source']} are not the ones this LoRA "
                       f"run was trained on ({saved.get('source')}; fingerprint {saved.get('sha256', '')[:12]} in the "
                       f"checkpoints of {checkpointer.directory}, {fingerprint['sha256'][:12]} now): resume on the "
                       "same base, or start a new --run.dir")
    history["lora_base"] = dict(fingerprint)


def _resume(resume: str, checkpointer, state, rng, state_sharding, say):
    """-> (state, rng, data position, history dict) from a checkpoint, or the fresh ones. `resume`: --run.resume
    (auto, never, or a checkpoint path)."""
    source, step = checkpointer, None
    if resume not in ("auto", "never"):
        directory, step = checkpointing.find_checkpoint_dir(resume)
        if os.path.abspath(directory) != checkpointer.directory:
            source = checkpointing.Checkpointer(directory, keep=10**9, async_save=False)
    elif resume == "never" and checkpointer.steps():
        raise RunError(f"{checkpointer.directory} already has checkpoints {checkpointer.steps()} and "
                       f"--run.resume is never: choose another --run.dir or resume")
    abstract = checkpointing.abstract_like(state, state_sharding)
    try:
        restored = source.restore(abstract, rng, step=step, say=say)
    finally:
        if source is not checkpointer:
            source.close()
    if source is checkpointer:  # the steps it fell back from leave their place (kept under rejected/)
        checkpointer.set_aside_rejected(jax.process_index() == 0, say)
    if restored is None:
        if resume not in ("auto", "never"):
            raise RunError(f"--run.resume {resume}: no checkpoint found there")
        return state, rng, 0, {}
    state, rng, meta = restored
    say(f"resumed from step {meta['step']} ({source.directory})")
    return state, rng, int(meta["data_position"]), dict(meta.get("extra") or {})


def _check_finite(pending, last_saved: int, checkpointer) -> None:
    """Raise NonFiniteLoss if the pending step's loss or gradient norm is not finite."""
    if pending is None:
        return
    step, metrics = pending
    loss, grad_norm = (float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm"))
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    checkpointer.wait()
    where = (f"the last good checkpoint is step {last_saved} in {checkpointer.directory}" if last_saved
             else "no checkpoint was written")
    raise NonFiniteLoss(f"the loss became {loss} (gradient norm {grad_norm}) at step {step}; stopped without "
                        f"saving; {where}. Lower --optim.lr or raise --optim.warmup_steps and resume.")


def _require_shape(batch: dict, sample_shape, step: int) -> dict:
    """`batch` if its examples have the shape (H, W, C) `sample_shape` (--data.sample_shape), else DataError."""
    want = tuple(sample_shape)
    got = tuple(batch["x0"].shape[1:])
    if got != want:
        raise datasets.DataError(f"batch at step {step} has examples of shape {got}, expected {want}")
    return batch


class _Evaluator:
    """Fixed evaluation noise and conditioning; sample grids, 1-jump error and the quality table.

    `sample` is the run's `config.SampleConfig`; `n` evaluation examples drawn with `seed`; `guidance_scale` the
    teacher's (its row's NFE). The teacher's reference samples (`sample.teacher_steps` DDIM steps) are computed
    once per run and cached in <run>/eval/teacher_reference.npz.
    """

    def __init__(self, sample, parts, mesh, teacher, run_dir, reporter, *, n: int, seed: int, guidance_scale: float):
        self.sample, self.parts, self.mesh, self.teacher = sample, parts, mesh, teacher
        self.run_dir, self.reporter, self.guidance_scale = run_dir, reporter, guidance_scale
        self.is_main = jax.process_index() == 0
        self.noise, self.cond, self.labels = parts.eval_inputs(n, seed)
        self._reference = None
        self.decode = getattr(parts, "decode", None)  # latents -> images for the grids, or None

    def _flow(self, params, jumps, n):
        noise, cond = sh.put_replicated(self.mesh, (self.noise[:n], _head(self.cond, n)))
        return _to_host(self.parts.sample_flow(params, self.teacher, noise, cond, jumps))

    def reference(self):
        """Teacher samples for the whole evaluation set, (n, H, W, C) float32."""
        if self._reference is None:
            path = os.path.join(self.run_dir, "eval", "teacher_reference.npz")
            if os.path.exists(path):
                with np.load(path, allow_pickle=False) as f:
                    if f["samples"].shape == self.noise.shape:
                        self._reference = f["samples"]
            if self._reference is None:
                t0 = time.perf_counter()
                noise, cond = sh.put_replicated(self.mesh, (self.noise, self.cond))
                self._reference = np.asarray(_to_host(self.parts.sample_teacher(
                    self.teacher, noise, cond, self.sample.teacher_steps)))
                self.reporter.message(f"teacher reference: {len(self.noise)} samples with "
                                      f"{self.sample.teacher_steps} steps in {time.perf_counter() - t0:.1f}s")
                if self.is_main:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    np.savez(path, samples=self._reference)
        return self._reference

    def flow_rows(self, params, suffix: str = "") -> list[dict]:
        """One quality-table row per `sample.jumps`: NFE, MSE to the teacher reference, quality numbers."""
        reference = self.reference()
        rows = []
        for jumps in self.sample.jumps:
            samples = np.asarray(self._flow(params, jumps, len(self.noise)))
            name = f"flow map {jumps} jump{'s' if jumps > 1 else ''}" + (f", {suffix}" if suffix else "")
            row = {"sampler": name, "nfe": jumps, "mse_to_teacher": float(np.mean((samples - reference) ** 2))}
            row.update(self.parts.quality(samples, self.labels) or {})
            rows.append(row)
        return rows

    def grid(self, params, step: int) -> None:
        """samples/step_N.png: one row per --sample.jumps and the teacher's; a latent teacher's rows decoded
        through its VAE (`parts.decode`, on process 0, in one batch)."""
        n = self.sample.grid_columns
        rows = [(f"{j} jump{'s' if j > 1 else ''}", np.asarray(self._flow(params, j, n)))
                for j in self.sample.jumps]
        rows.append((f"teacher {self.sample.teacher_steps}", self.reference()[:n]))
        if self.is_main and self.decode is not None:
            t0 = time.perf_counter()
            try:
                images = self.decode(np.concatenate([x for _, x in rows]))
            except Exception as error:  # noqa: BLE001 - a grid never stops the run: latents instead
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                self.reporter.message(f"warning: decoding the sample grid through the VAE failed ({first}); grids "
                                      "show latents")
                self.decode = None
            else:
                sizes = np.cumsum([len(x) for _, x in rows])[:-1]
                rows = [(name, x) for (name, _), x in zip(rows, np.split(images, sizes))]
                self.reporter.message(f"decoded {len(images)} grid latents through the VAE in "
                                      f"{time.perf_counter() - t0:.1f}s")
        if self.is_main:
            path = image_grid.save_grid(os.path.join(self.run_dir, "samples", f"step_{step:06d}.png"), rows)
            self.reporter.image("samples", path, step)
            self.reporter.message(f"sample grid: {path}")

    def quality_table(self, params, history: dict, step: int) -> list:
        reference = self.reference()
        guided = self.guidance_scale
        rows = []
        teacher_row = {"sampler": f"teacher DDIM {self.sample.teacher_steps} steps",
                       "nfe": self.sample.teacher_steps * (2 if guided != 1.0 else 1), "mse_to_teacher": 0.0}
        teacher_row.update(self.parts.quality(reference, self.labels) or {})
        rows.append(teacher_row)
        rows += list(history.get("baseline", []))
        rows += self.flow_rows(params)
        notes = [f"step {step}, {len(self.noise)} samples, the same noise and conditioning in every row",
                 "mse_to_teacher: mean squared difference to the teacher's samples from the same noise"]
        if self.is_main:
            text = reporting.write_quality_table(self.run_dir, rows, notes)
            self.reporter.message("quality:\n" + text)
        return rows


def _head(cond, n):
    return None if cond is None else jax.tree.map(lambda x: x[:n], cond)


def main(argv=None, build: Callable | None = None) -> int:
    """The command line: parse flags, run, turn known failures into one line on stderr and an exit code
    (`flowmap_jax.cli.cli_exit.exit_code`: 2 bad flags or bad input, 1 the run failed; anything else is a
    bug and keeps its traceback)."""
    try:
        result = run(train_cli.parse_args(argv), build)
    except Exception as error:  # mapped below, or re-raised
        code = cli_exit.exit_code(error)
        if code is None:
            raise
        cli_exit.report(error)
        return code
    if result.status == "preempted":
        print(f"stopped at step {result.step} (checkpoint saved)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli_exit.run_main(main)
