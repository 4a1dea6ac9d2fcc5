"""Sample quality against network evaluations (issue 6): the digits teacher's ODE solvers and a flow map.

    python -m flowmap_jax.train                                   # 1. train a flow map -> runs/digits/export
    python benchmarks/quality_vs_steps.py --run runs/digits       # 2. this benchmark (the full sweep, see below)
    python benchmarks/quality_vs_steps.py --model EXPORT_FOLDER   #    or any exported flow map
    python benchmarks/quality_vs_steps.py --run runs/digits --num-samples 200 --out /tmp/q   # a quick look
    python benchmarks/quality_vs_steps.py --teacher-only          # only the teacher's curves

(`python -m conversion export RUN_DIR OUT` exports a run that stopped before its own export.)

Samplers, all from the same initial noise and labels (sample i has label i % 10; noise from
`numpy.random.default_rng(--seed)`), in JAX, jitted and batched (`--batch` samples per call):
- the teacher (classifier-free guidance at the flow map's distilled scale, else `--guidance-scale`) with
  DDIM, Heun and DPM-Solver++(2M) (`flowmap_jax.core.samplers`) on the uniform "trailing" grid in teacher time
  (`spec.time_grid.time_grid`: 999 ... -1, the clean end) at `--nfe` network evaluations: DDIM and DPM-Solver++
  take that many steps; Heun takes k = (n + 1) // 2 steps = 2k - 1 evaluations (its last step, into the
  clean end, is Euler), so it lands on 1, 3, 7, 15, 31, 49, 99 (n = 2 repeats 1 and is dropped);
- the flow map with `--jumps` jumps on the same kind of grid (one jitted jump, looped), and with
  `--flow-map-grids uniform,logsnr` also on the log-SNR grid (`spec.time_grid.time_grid(spacing="logsnr")`:
  times uniform in log(sigma / alpha), 2 jumps -> [999, ~302, -1]), a second flow-map curve.
One network evaluation (NFE) is one guided teacher evaluation (the conditional and unconditional UNet
passes, batched as one call of batch 2B) or one flow-map jump (one pass of the distilled, guidance-baked
UNet). The JSON also gives `unet_passes` per sample.

Metrics (`flowmap_jax.digits.quality.digits_quality_report`, the shipped digits classifier): Frechet
distance in its feature space against the 500 held-out real digits (comparable only at equal sample
counts), its label accuracy against the conditioning label, and the mean squared distance to the teacher's
100-step DPM-Solver++(2M) solution from the same noise (`--reference-steps`; that sampler's own row is 0 by
construction) on `--reference-grid` ("logsnr" by default, ~6x more accurate than "uniform" on SD's schedule, which
the tables recorded before issue 26 used; see benchmarks/README.md and benchmarks/teacher_target_error.py). For scale, the same Frechet distance of the 1297 real training digits is printed.

Outputs (`--out`, default benchmarks/results): quality_vs_steps.json, quality_vs_steps.png (the three
metrics side by side, for the README), quality_vs_steps_{frechet,accuracy,mse}.png (one per metric), and
quality_vs_steps_grid.png (rows: flow map 1, 2, 4 jumps, teacher DDIM 50 steps; columns labels 0..9). A
markdown table goes to stdout.

Cost: the full sweep is ~640 guided teacher evaluations (~1280 UNet passes) per sample, which on 2 shared
CPU cores runs at roughly 40-200 UNet passes per second for this 1.7M-parameter UNet: hours for the default
2000 samples, minutes for 200 (on a GPU, minutes for the default). Samples are cached per sampler and chunk
under `--cache` (default ~/.cache/flowmap_jax/quality_vs_steps), so an interrupted run resumes where it
stopped; the keys cover the teacher's files, guidance scale and seed (teacher samples), the flow map's files and the
seed (flow-map samples), so a new flow map reuses the teacher's samples. JAX's
persistent compilation cache is on (as in the trainer). The script prints its plan and an ETA.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_NFE = (1, 2, 4, 8, 16, 32, 50, 100)
DEFAULT_JUMPS = (1, 2, 4, 8, 16)
SOLVERS = ("ddim", "heun", "dpmpp_2m")
SOLVER_NAMES = {"ddim": "teacher DDIM", "heun": "teacher Heun", "dpmpp_2m": "teacher DPM-Solver++(2M)"}
GRID_ROWS = ((1, "flow map 1 jump"), (2, "flow map 2 jumps"), (4, "flow map 4 jumps"))


# --------------------------------------------------------------------------------------------------
# The plan: which samplers run, with how many steps and evaluations (pure Python, tested).

def solver_steps(solver: str, nfe: int) -> tuple[int, int]:
    """(steps, actual NFE) of `solver` for a budget of `nfe` guided evaluations (see the module docstring)."""
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    if solver == "heun":
        steps = (nfe + 1) // 2
        return steps, 2 * steps - 1
    if solver in ("ddim", "dpmpp_2m"):
        return nfe, nfe
    raise ValueError(f"unknown solver {solver!r}: expected one of {SOLVERS}")


FLOW_MAP_SOLVER = {"uniform": "flow map", "logsnr": "flow map (log-SNR grid)"}


def flow_map_key(jumps: int, spacing: str = "uniform") -> str:
    return f"flow_map_{jumps}" if spacing == "uniform" else f"flow_map_{spacing}_{jumps}"


REFERENCE_GRIDS = ("uniform", "logsnr")


def reference_key(reference_steps: int, reference_grid: str = "uniform") -> str:
    """The plan key of the MSE reference: "dpmpp_2m_<steps>" on the uniform grid (the same run as that
    sampler's own row), "dpmpp_2m_<grid>_<steps>" otherwise."""
    if reference_grid not in REFERENCE_GRIDS:
        raise ValueError(f"unknown reference grid {reference_grid!r}: expected one of {REFERENCE_GRIDS}")
    return f"dpmpp_2m_{reference_steps}" if reference_grid == "uniform" else \
        f"dpmpp_2m_{reference_grid}_{reference_steps}"


def plan_runs(solvers, nfe_list, jumps_list, reference_steps: int, include_flow_map: bool,
              flow_map_grids=("uniform",), reference_grid: str = "uniform") -> list[dict]:
    """The sampler runs: dicts with key (unique id), kind ("teacher"/"flow_map"), solver, steps, nfe, name,
    unet_passes (per sample), spacing (the time grid's). Teacher runs of the same solver and step count
    appear once; the MSE reference (DPM-Solver++(2M), `reference_steps` on `reference_grid`) is always in
    the plan (key `reference_key(...)`)."""
    runs, seen = [], set()
    for solver in solvers:
        for nfe in nfe_list:
            steps, actual = solver_steps(solver, int(nfe))
            key = f"{solver}_{steps}"
            if key not in seen:
                seen.add(key)
                runs.append(dict(key=key, kind="teacher", solver=solver, steps=steps, nfe=actual,
                                 name=SOLVER_NAMES[solver], unet_passes=2 * actual))
    ref_key = reference_key(reference_steps, reference_grid)
    if ref_key not in seen:
        grid = "" if reference_grid == "uniform" else f", {reference_grid} grid"
        runs.append(dict(key=ref_key, kind="teacher", solver="dpmpp_2m", steps=reference_steps, nfe=reference_steps,
                         name=SOLVER_NAMES["dpmpp_2m"] + f" (reference{grid})", unet_passes=2 * reference_steps,
                         spacing=reference_grid))
    if include_flow_map:
        for spacing in flow_map_grids:
            if spacing not in FLOW_MAP_SOLVER:
                raise ValueError(f"unknown flow-map grid {spacing!r}: expected some of {tuple(FLOW_MAP_SOLVER)}")
            for jumps in jumps_list:
                runs.append(dict(key=flow_map_key(jumps, spacing), kind="flow_map", solver=FLOW_MAP_SOLVER[spacing],
                                 steps=int(jumps), nfe=int(jumps), name=FLOW_MAP_SOLVER[spacing],
                                 unet_passes=int(jumps), spacing=spacing))
    return runs


def parse_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def target_checks(rows: list[dict]) -> list[str]:
    """The targets, as lines of text (a target whose rows are missing is left out):
    - issue 6: flow map at 2 jumps within 10% of the teacher's 50-step (DDIM) Frechet distance, at 4 jumps
      within 5%;
    - issue 26 (MSE to the reference): on each flow-map grid the MSE falls with every doubling of the jumps
      (1 > 2 > 4 > 8 > 16, the rows there are); 8 jumps <= 0.5x DDIM-8 and <= DPM-Solver++(2M) at 8 NFE;
      16 jumps <= DPM-Solver++(2M) at 16 NFE."""
    by_key = {r["key"]: r for r in rows}
    lines = []
    teacher = by_key.get("ddim_50")
    for spacing, (jumps, tolerance) in ((g, jt) for g in FLOW_MAP_SOLVER for jt in ((2, 0.10), (4, 0.05))):
        row = by_key.get(flow_map_key(jumps, spacing))
        if row is None or teacher is None:
            continue
        excess = row["frechet_distance"] / teacher["frechet_distance"] - 1.0
        verdict = "met" if excess <= tolerance else "missed"
        grid = "" if spacing == "uniform" else f" ({spacing} grid)"
        lines.append(f"flow map {jumps} jumps{grid}: Frechet {row['frechet_distance']:.4g} vs teacher DDIM 50 "
                     f"{teacher['frechet_distance']:.4g} ({excess * 100:+.1f}%; target <= +{tolerance * 100:.0f}%: "
                     f"{verdict})")
    for spacing in FLOW_MAP_SOLVER:
        grid = "" if spacing == "uniform" else f" ({spacing} grid)"
        curve = sorted((r["steps"], r["mse_to_reference"]) for r in rows
                       if r.get("kind") == "flow_map" and r.get("spacing", "uniform") == spacing)
        if len(curve) > 1:
            falls = all(b[1] < a[1] for a, b in zip(curve, curve[1:]))
            shown = " > ".join(f"{m:.3g} ({n})" for n, m in curve)
            lines.append(f"flow map{grid} MSE by jumps: {shown}: falls with N: {'met' if falls else 'missed'}")
        for jumps, solver, factor in ((8, "ddim", 0.5), (8, "dpmpp_2m", 1.0), (16, "dpmpp_2m", 1.0)):
            row, other = by_key.get(flow_map_key(jumps, spacing)), by_key.get(f"{solver}_{jumps}")
            if row is None or other is None:
                continue
            ratio = row["mse_to_reference"] / other["mse_to_reference"]
            verdict = "met" if ratio <= factor else "missed"
            lines.append(f"flow map {jumps} jumps{grid}: MSE {row['mse_to_reference']:.4g} vs {SOLVER_NAMES[solver]} "
                         f"{jumps} {other['mse_to_reference']:.4g} ({ratio:.2f}x; target <= {factor:g}x: {verdict})")
    return lines


# --------------------------------------------------------------------------------------------------
# Loading the teacher and the flow map.

def resolve_model(run: str | None, model: str | None) -> Path | None:
    """The exported flow-map folder from --run (RUN/export) or --model; None for neither."""
    if run and model:
        raise SystemExit("give --run or --model, not both")
    if run:
        folder = Path(run) / "export"
        if not (folder / "flowmap.json").is_file():
            raise SystemExit(f"--run {run}: no exported flow map at {folder} (the run has not finished; "
                             f"export its newest checkpoint with: python -m conversion export {run} {folder})")
        return folder
    if model:
        if not (Path(model) / "flowmap.json").is_file():
            raise SystemExit(f"--model {model}: not an exported flow map (no flowmap.json); train one with "
                             f"python -m flowmap_jax.train, or export a run with python -m conversion export")
        return Path(model)
    return None


def folder_fingerprint(*folders) -> str:
    """A short hash of the names, sizes and modification times of every file under the folders."""
    h = hashlib.sha256()
    for folder in folders:
        if folder is None:
            continue
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                stat = path.stat()
                h.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def load_teacher(folder: Path, guidance_scale: float):
    """(Teacher, label table (K + 1, D) float32, schedule, UNet config dict) of a digits-style teacher folder
    (UNet in unet/, scheduler/, label_embeddings.safetensors), through the same loaders as the trainer."""
    import jax.numpy as jnp

    from flowmap_jax.training.assembly import load_teacher_unet
    from flowmap_jax.spec.label_table import read_label_embeddings
    from flowmap_jax.core.teacher import Teacher, unet_teacher_fn
    from flowmap_jax.data.teacher_folder import load_schedule
    from flowmap_jax.unet import FlaxUNet2DConditionModel, UNetConfig

    unet_config, params = load_teacher_unet(str(folder), "unet")
    schedule, prediction_type = load_schedule(str(folder), "scheduler")
    table = read_label_embeddings(folder / "label_embeddings.safetensors")
    unet = FlaxUNet2DConditionModel(UNetConfig.from_dict(unet_config))
    uncond = {"encoder_hidden_states": jnp.asarray(table[-1][None, None, :])}
    teacher = Teacher.create(unet_teacher_fn(unet), params, schedule, prediction_type,
                             guidance_scale=guidance_scale, uncond=uncond)
    return teacher, table, schedule, unet_config


def baked_guidance(exported, model_dir) -> float | None:
    """The CFG scale a loaded flow-map export distilled (None for an unguided map); SystemExit for a map
    that takes the guidance scale as an input (not supported by these benchmarks)."""
    if exported.config.guidance_embedded:
        raise SystemExit(f"{model_dir}: a flow map with the guidance scale as an input is not supported here")
    return exported.config.guidance_scale if exported.config.guidance == "cfg" else None


def default_guidance() -> float:
    """The teacher's CFG scale when neither the flag nor the flow map gives one (the trainer's default)."""
    from flowmap_jax.training.config import TeacherConfig

    return TeacherConfig().guidance_scale


def evaluation_inputs(unet_config: dict, table, n: int, seed: int):
    """(noise (n, H, W, C) float32 from `seed`, labels (n,) int: sample i has label i % K): the inputs every
    row of the quality table (and `jump_error.py`) starts from."""
    import numpy as np

    size = int(unet_config.get("sample_size", 16))
    sample_shape = (size, size, int(unet_config.get("in_channels", 1)))
    noise = np.random.default_rng(seed).standard_normal((n, *sample_shape)).astype(np.float32)
    return noise, np.arange(n) % (table.shape[0] - 1)


# --------------------------------------------------------------------------------------------------
# Sampling with a chunk cache.

class Sampler:
    """Jitted samplers over fixed noise and labels; results cached per (run, chunk) as .npy files."""

    def __init__(self, teacher, table, flow_map, flow_params, noise, labels, batch, cache_dirs: dict | None):
        import jax
        import jax.numpy as jnp

        from flowmap_jax.core import samplers

        self.jax, self.jnp = jax, jnp
        self.teacher, self.table, self.noise, self.labels, self.batch = teacher, table, noise, labels, batch
        self.flow_map, self.flow_params = flow_map, flow_params
        self.cache_dirs = cache_dirs  # {"teacher": folder, "flow_map": folder} or None
        self._teacher_fns = {}
        self.samplers = samplers
        if flow_map is not None:
            self._jump = samplers.make_jump(flow_map)

    def _cond(self, labels):
        return {"encoder_hidden_states": self.jnp.asarray(self.table[labels][:, None, :])}

    def _teacher_fn(self, solver):
        if solver not in self._teacher_fns:
            fn = self.samplers.SOLVERS[solver]
            # The grid is a traced argument: one compilation per (solver, number of steps).
            self._teacher_fns[solver] = self.jax.jit(lambda teacher, x, cond, grid: fn(teacher, x, grid, cond=cond))
        return self._teacher_fns[solver]

    def _chunk(self, run, start, stop):
        import numpy as np

        from flowmap_jax.spec.time_grid import time_grid

        x = self.jnp.asarray(self.noise[start:stop])
        cond = self._cond(self.labels[start:stop])
        grid = time_grid(self.teacher.schedule, run["steps"], spacing=run.get("spacing", "uniform"))
        if run["kind"] == "teacher":
            out = self._teacher_fn(run["solver"])(self.teacher, x, cond, self.jnp.asarray(grid, self.jnp.float32))
        else:
            out = self.samplers.flow_map_sample(self.flow_map, self.flow_params, x, grid, cond, jump=self._jump)
        return np.asarray(out, np.float32)

    def run(self, run, progress=None):
        """(samples (N, H, W, C) float32, seconds spent computing, chunks read from the cache)."""
        import numpy as np

        parts, seconds, cached = [], 0.0, 0
        n = len(self.noise)
        for start in range(0, n, self.batch):
            stop = min(start + self.batch, n)
            path = None if not self.cache_dirs else self.cache_dirs[run["kind"]] / f"{run['key']}_{start}_{stop}.npy"
            if path is not None and path.is_file():
                parts.append(np.load(path))
                cached += 1
                continue
            t0 = time.perf_counter()
            chunk = self._chunk(run, start, stop)
            seconds += time.perf_counter() - t0
            if path is not None:
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, chunk)
                os.replace(tmp, path)
            parts.append(chunk)
            if progress:
                progress(run, start, stop, time.perf_counter() - t0)
        return np.concatenate(parts), seconds, cached


# --------------------------------------------------------------------------------------------------
# Plots and tables.

METRICS = (("frechet_distance", "Frechet distance (classifier features)", "frechet", True),
           ("label_accuracy", "label accuracy", "accuracy", False),
           ("mse_to_reference", "MSE to the teacher's {ref}-step ODE solution", "mse", True))
STYLES = {"ddim": ("tab:blue", "o"), "heun": ("tab:orange", "s"), "dpmpp_2m": ("tab:green", "^"),
          "flow map": ("tab:red", "D"), "flow map (log-SNR grid)": ("tab:purple", "v")}


def curves(rows):
    """{solver: [rows sorted by nfe]} (the reference-only run belongs to the DPM-Solver++ curve, unless it is
    on another grid than the curves: then it is left out, its MSE being 0 by construction)."""
    out = {}
    for row in rows:
        if row.get("kind") == "teacher" and row.get("spacing", "uniform") != "uniform":
            continue
        out.setdefault(row["solver"], []).append(row)
    return {k: sorted(v, key=lambda r: r["nfe"]) for k, v in out.items()}


def _plot_metric(ax, rows, metric, label, log_y, real=None):
    for solver, group in curves(rows).items():
        color, marker = STYLES.get(solver, ("gray", "x"))
        xs = [r["nfe"] for r in group if r.get(metric) is not None and (not log_y or r[metric] > 0)]
        ys = [r[metric] for r in group if r.get(metric) is not None and (not log_y or r[metric] > 0)]
        name = f"{solver} (jumps)" if group[0]["kind"] == "flow_map" else SOLVER_NAMES.get(solver, solver)
        ax.plot(xs, ys, marker=marker, color=color, label=name, linewidth=1.2, markersize=4)
    if real is not None and metric in real:
        ax.axhline(real[metric], color="gray", linestyle=":", linewidth=1, label="real training digits")
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_title(label, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def write_plots(rows, real, out: Path, subtitle: str, reference_steps: int = 100, suffix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=80)
    for ax, (metric, label, _, log_y) in zip(axes, METRICS):
        _plot_metric(ax, rows, metric, label.format(ref=reference_steps), log_y, real)
    axes[0].legend(fontsize=7)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    paths.append(out / f"quality_vs_steps{suffix}.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    for metric, label, short, log_y in METRICS:
        fig, ax = plt.subplots(figsize=(5, 3.6), dpi=80)
        _plot_metric(ax, rows, metric, label.format(ref=reference_steps), log_y, real)
        ax.legend(fontsize=7)
        fig.suptitle(subtitle, fontsize=8)
        fig.tight_layout()
        paths.append(out / f"quality_vs_steps{suffix}_{short}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def markdown_table(rows) -> str:
    lines = ["| sampler | steps | NFE | UNet passes | Frechet distance | label accuracy | MSE to reference |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kind"] == "flow_map", r["solver"], r["nfe"])):
        lines.append(f"| {r['name']} | {r['steps']} | {r['nfe']} | {r['unet_passes']} | {r['frechet_distance']:.4g} | "
                     f"{r['label_accuracy']:.4f} | {r['mse_to_reference']:.4g} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a training run folder (its export/ is used)")
    p.add_argument("--model", default=None, help="an exported flow-map folder (flowmap.json)")
    p.add_argument("--teacher-only", action="store_true", help="no flow map: only the teacher's curves")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the shipped digits teacher)")
    p.add_argument("--guidance-scale", type=float, default=None, help="the teacher's CFG scale (default: the flow "
                   "map's distilled scale, else the digits preset's)")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per sampler (default 2000)")
    p.add_argument("--batch", type=int, default=100, help="samples per jitted call (default 100, about the "
                   "fastest on 2 CPU cores; larger on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--nfe", type=parse_int_list, default=DEFAULT_NFE, help="teacher NFE budgets (default "
                   + ",".join(map(str, DEFAULT_NFE)) + ")")
    p.add_argument("--solvers", default=",".join(SOLVERS), help="teacher solvers (default ddim,heun,dpmpp_2m)")
    p.add_argument("--flow-map-grids", default="uniform", help="flow-map time grids, comma-separated: uniform "
                   "(default), logsnr")
    p.add_argument("--jumps", type=parse_int_list, default=DEFAULT_JUMPS, help="flow-map jumps (default 1,2,4,8)")
    p.add_argument("--reference-steps", type=int, default=100, help="DPM-Solver++(2M) steps of the MSE reference")
    p.add_argument("--reference-grid", default="logsnr", choices=REFERENCE_GRIDS,
                   help="time grid of the MSE reference (default logsnr; the tables recorded before issue 26 used "
                        "uniform, whose own error on SD's schedule is ~6x larger: benchmarks/README.md)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNGs (default benchmarks/results)")
    p.add_argument("--suffix", default="", help="appended to the output files' names: --suffix _s0 writes "
                   "quality_vs_steps_s0.json, quality_vs_steps_s0.png, ... (default none)")
    p.add_argument("--cache", default=None, help="sample cache folder (default ~/.cache/flowmap_jax/"
                   "quality_vs_steps; 'none' to switch it off)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    solvers = tuple(s for s in args.solvers.split(",") if s)
    for s in solvers:
        if s not in SOLVERS:
            raise SystemExit(f"--solvers: unknown solver {s!r}; expected some of {SOLVERS}")
    if args.num_samples < 2 or args.batch < 1:
        raise SystemExit("--num-samples must be >= 2 and --batch >= 1")
    model_dir = None if args.teacher_only else resolve_model(args.run, args.model)
    if model_dir is None and not args.teacher_only:
        raise SystemExit("give --run RUN_DIR or --model EXPORT (or --teacher-only); see --help")
    from flowmap_jax.digits import TEACHER_DIR

    teacher_dir = Path(args.teacher or TEACHER_DIR)
    if not (teacher_dir / "unet" / "config.json").is_file():
        raise SystemExit(f"no digits teacher at {teacher_dir} (unet/config.json missing): train it with "
                         f"python -m torch_ref.train_digits_teacher, or pass --teacher FOLDER")
    started = time.perf_counter()
    load_start = os.getloadavg()[0]

    import jax
    import numpy as np

    _compilation_cache()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    flow_map = flow_params = None
    guidance = args.guidance_scale
    notes = []
    if model_dir is not None:
        from flowmap_jax.core.export_loading import jax_flow_map, load_flow_map_export

        exported = load_flow_map_export(model_dir, dtype=np.float32)
        baked = baked_guidance(exported, model_dir)
        if guidance is None:
            guidance = baked
        elif baked is not None and guidance != baked:
            notes.append(f"the teacher uses --guidance-scale {guidance}, the flow map was distilled at {baked}")
        flow_map = jax_flow_map(exported, jit=False)
        flow_params = jax.device_put(exported.params)
    if guidance is None:
        guidance = default_guidance()
    teacher, table, schedule, unet_config = load_teacher(teacher_dir, guidance)
    if flow_map is not None and flow_map.schedule != schedule:
        raise SystemExit(f"the flow map's schedule ({flow_map.schedule.kind}) differs from the teacher's at "
                         f"{teacher_dir}: pass the teacher it was distilled from with --teacher")

    try:
        runs = plan_runs(solvers, args.nfe, args.jumps, args.reference_steps, flow_map is not None,
                         tuple(g for g in args.flow_map_grids.split(",") if g), args.reference_grid)
    except ValueError as error:
        raise SystemExit(f"--flow-map-grids: {error}") from None
    n = args.num_samples
    noise, labels = evaluation_inputs(unet_config, table, n, args.seed)
    cache_dirs = None
    if (args.cache or "").lower() != "none":
        base = Path(args.cache) if args.cache else (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowmap_jax" / "quality_vs_steps")
        # Teacher samples depend on the teacher, its guidance and the noise only: a new flow map reuses them.
        cache_dirs = {"teacher": base / f"teacher_{folder_fingerprint(teacher_dir)}_w{guidance:g}_seed{args.seed}"}
        if model_dir is not None:
            cache_dirs["flow_map"] = base / f"flow_map_{folder_fingerprint(model_dir)}_seed{args.seed}"
        for folder in cache_dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
    total_passes = sum(r["unet_passes"] for r in runs) * n
    log(f"plan: {len(runs)} samplers x {n} samples = {total_passes / 1e6:.2f}M UNet passes (batch {args.batch}); "
        f"teacher {teacher_dir} (CFG {guidance:g}); flow map {model_dir}; cache {cache_dirs and base}")

    sampler = Sampler(teacher, table, flow_map, flow_params, noise, labels, args.batch, cache_dirs)
    from flowmap_jax.digits.quality import digits_quality_report

    done = {"passes": 0, "seconds": 0.0, "left": total_passes}

    def progress(run, start, stop, seconds):
        done["passes"] += run["unet_passes"] * (stop - start)
        done["left"] -= run["unet_passes"] * (stop - start)
        done["seconds"] += seconds
        rate = done["passes"] / max(done["seconds"], 1e-9)
        log(f"  {run['key']}: {stop}/{n} samples, {seconds:.1f}s; {rate:.0f} UNet passes/s so far (compilation "
            f"included), about {done['left'] / rate / 60:.0f} min left")

    samples, seconds = {}, {}
    # The reference first (MSE needs it), then the rest in plan order.
    ref_key = reference_key(args.reference_steps, args.reference_grid)
    order = sorted(runs, key=lambda r: r["key"] != ref_key)
    for run in order:
        t0 = time.perf_counter()
        samples[run["key"]], seconds[run["key"]], cached = sampler.run(run, progress)
        done["left"] -= run["unet_passes"] * min(cached * args.batch, n)
        log(f"{run['key']}: {time.perf_counter() - t0:.1f}s ({cached} chunk(s) from the cache)")
    reference = samples[ref_key]
    rows = []
    for run in runs:
        report = digits_quality_report(samples[run["key"]], labels, reference)
        rows.append({**run, **{k: report[k] for k in ("frechet_distance", "label_accuracy", "mse_to_reference",
                                                       "num_samples")}, "seconds": seconds[run["key"]]})
    from flowmap_jax.digits.data import load_digits

    real_images, real_labels = load_digits("train")
    real = digits_quality_report(real_images, real_labels)
    checks = target_checks(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subtitle = (f"digits teacher (CFG {guidance:g}) vs flow map, {n} samples each, same noise and labels")
    plots = write_plots(rows, real, out, subtitle, args.reference_steps, args.suffix)
    grid_rows = []
    if flow_map is not None:
        for jumps, name in GRID_ROWS:
            if flow_map_key(jumps) in samples:
                grid_rows.append((name, samples[flow_map_key(jumps)][:10]))
    if "ddim_50" in samples:
        grid_rows.append(("teacher DDIM 50", samples["ddim_50"][:10]))
    if grid_rows:
        from flowmap_jax.spec.image_grid import save_grid

        plots.append(Path(save_grid(str(out / f"quality_vs_steps{args.suffix}_grid.png"), grid_rows, scale=3)))
    seconds_total = time.perf_counter() - started
    summary = {
        "teacher": str(teacher_dir), "model": None if model_dir is None else str(model_dir),
        "guidance_scale": guidance, "num_samples": n, "seed": args.seed, "batch": args.batch,
        "reference": f"dpmpp_2m {args.reference_steps} steps, {args.reference_grid} grid", "real_train_digits": real,
        "rows": rows, "targets": checks, "notes": notes, "seconds": seconds_total,
        "unet_passes_per_s": done["passes"] / done["seconds"] if done["seconds"] else None,
        "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
        "command": "python benchmarks/quality_vs_steps.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    (out / f"quality_vs_steps{args.suffix}.json").write_text(json.dumps(summary, indent=2))
    print(f"digits teacher {teacher_dir} (CFG {guidance:g}), flow map {model_dir}; {n} samples per sampler, "
          f"seed {args.seed}; reference DPM-Solver++(2M) {args.reference_steps} steps ({args.reference_grid} grid)\n")
    print(markdown_table(rows))
    print(f"\nreal training digits (1297): Frechet distance {real['frechet_distance']:.4g}, label accuracy "
          f"{real['label_accuracy']:.4f}")
    for line in checks + notes:
        print(f"- {line}")
    print(f"\n{seconds_total:.0f}s in all (load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end); "
          f"wrote {out / f'quality_vs_steps{args.suffix}.json'} and " + ", ".join(p.name for p in plots))
    return 0


def _compilation_cache():
    """JAX's persistent compilation cache, where the trainer keeps it (reruns skip compiling)."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "flowmap_jax", "xla")
    try:
        os.makedirs(folder, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", folder)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
