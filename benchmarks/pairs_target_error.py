"""The `pairs` target's error on a real teacher and its data, next to the trained map's own error (issue 15).

    python benchmarks/pairs_target_error.py                          # the digits preset (~4 min on 2 CPU cores)
    python benchmarks/pairs_target_error.py --run runs/digits        # also that run's exported map on the same pairs
    python benchmarks/pairs_target_error.py --run RUN --steps 4,8,16 --examples 256

`benchmarks/teacher_target_error.py` measures the target against the exact ODE on Gaussian-mixture data,
where the exact solution is known. This script asks the question of a preset: is the target the trainer
regresses on more accurate than the map it trains? On the run's own teacher (the UNet, its guidance, its
data), it draws training pairs exactly as the `pairs` objective draws them (the run's `TimePairConfig`,
the source clipped into the teacher's evaluation range, x_s = alpha_s x0 + sigma_s eps with x0 from the
run's dataset and its conditioning), solves the teacher's PF-ODE from s to t with `teacher_solve` at each
`--steps` (the run's solver and spacing) and compares with a converged solution of `--reference-steps`
steps (the same solver on the log-SNR grid; its own error is reported as the distance to
`--reference-steps` / 2 steps, which bounds it). Error: RMS(target - reference) / RMS(reference) over all
elements, and the mean per-example relative error. With `--run`, the run's exported flow map (its EMA
weights) X(x_s, s, t) on the same pairs gets the same two numbers: the target should sit well below them.

Without `--run` the digits preset is used (its teacher and data; no map row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def load_config(run: str | None):
    """The run's TrainConfig (its config.json), or the digits preset."""
    from flowmap_jax.training import config, train_cli

    if run is None:
        return train_cli.parse_args([])
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --run {run}: no config.json (not a training run folder)")
    return config.load_config_file(path)


def draw_problem(parts, config, examples: int, seed: int) -> dict:
    """`examples` training pairs drawn by the `pairs` objective's own `objectives._prepare` (its time pairs,
    source clipping, noise and guidance scale): a dict with x_s, s, t, cond, student_cond and w."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flowmap_jax.core import objectives
    from flowmap_jax.core.flow_map import FlowMap

    batch = parts.dataset.get(np.random.default_rng(seed).integers(0, parts.dataset.num_examples, size=examples))
    batch = {"x0": jnp.asarray(batch["x0"]),
             "cond": None if batch.get("cond") is None else jax.tree.map(jnp.asarray, batch["cond"])}
    schedule, options = parts.teacher.schedule, config.objective.options
    shape_only = FlowMap(net=lambda *args: None, schedule=schedule, prediction_type=parts.teacher.prediction_type)
    return objectives._prepare(shape_only, options, batch, jax.random.key(seed),
                               source_range=objectives._eval_range(schedule, options, False))


def in_chunks(fn, problem: dict, chunk: int):
    """fn(x_s, s, t, cond, student_cond, w) over `chunk` examples at a time, concatenated."""
    import jax
    import jax.numpy as jnp

    keys = ("x_s", "s", "t", "cond", "student_cond", "w")

    def part(start):
        return [jax.tree.map(lambda v: v[start:start + chunk], problem[k]) for k in keys]

    return jnp.concatenate([fn(*part(i)) for i in range(0, problem["x_s"].shape[0], chunk)])


def solve(parts, options, problem: dict, steps: int, spacing: str, chunk: int):
    """The teacher's PF-ODE from s to t (`teacher_solve`, the objective's solver and guidance scale)."""
    import jax

    from flowmap_jax.core import samplers

    fn = jax.jit(lambda tch, x, a, b, c, w: samplers.teacher_solve(tch, x, a, b, steps, options.teacher_solver, c,
                                                                    w, spacing=spacing))
    return in_chunks(lambda x, a, b, c, _, w: fn(parts.teacher, x, a, b, c, w), problem, chunk)


def errors(estimate, reference) -> tuple[float, float]:
    """(RMS(estimate - reference) / RMS(reference), mean per-example relative error)."""
    import numpy as np

    est = np.asarray(estimate, np.float64).reshape(estimate.shape[0], -1)
    ref = np.asarray(reference, np.float64).reshape(reference.shape[0], -1)
    diff = est - ref
    overall = float(np.sqrt(np.mean(diff ** 2)) / np.sqrt(np.mean(ref ** 2)))
    per = np.sqrt(np.mean(diff ** 2, axis=1)) / np.maximum(np.sqrt(np.mean(ref ** 2, axis=1)), 1e-12)
    return overall, float(np.mean(per))


def map_estimate(run: str, problem: dict, chunk: int):
    """X(x_s, s, t) of the run's exported flow map (EMA weights), float32, and its parameterisation."""
    import jax
    import jax.numpy as jnp

    from flowmap_jax.core.export_loading import jax_flow_map, load_flow_map_export

    folder = os.path.join(run, "export")
    if not os.path.isfile(os.path.join(folder, "flowmap.json")):
        raise SystemExit(f"error: --run {run}: no export/flowmap.json (export the run first: "
                         f"python -m conversion export {run} {folder})")
    exported = load_flow_map_export(folder)
    fmap = jax_flow_map(exported)
    params = jax.tree.map(jnp.asarray, exported.params)
    return (in_chunks(lambda x, a, b, _, c, w: fmap(params, x, a, b, c), problem, chunk),
            exported.config.parameterization)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="a training run folder (config.json, export/); default: the digits preset")
    p.add_argument("--steps", type=parse_int_list, default=[4, 6, 8, 12, 16, 32], help="target step counts")
    p.add_argument("--reference-steps", type=int, default=128, help="steps of the converged solution")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--chunk", type=int, default=64, help="examples per jitted call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from flowmap_jax.training import assembly

    config = load_config(args.run)
    parts = assembly.build(config, None)
    options = config.objective.options
    problem = draw_problem(parts, config, args.examples, args.seed)
    guided = 2 if parts.teacher.guidance != "none" else 1
    evals_extra = 1 if parts.teacher.schedule.t_eval_min > parts.teacher.schedule.t_clean else 0

    start = time.time()
    reference = solve(parts, options, problem, args.reference_steps, "logsnr", args.chunk)
    half = solve(parts, options, problem, args.reference_steps // 2, "logsnr", args.chunk)
    rows = [dict(what=f"reference check: {args.reference_steps // 2} log-SNR steps",
                 steps=args.reference_steps // 2, teacher_evals=args.reference_steps // 2 + evals_extra,
                 **dict(zip(("rel_rms", "mean_rel"), errors(half, reference))))]
    for steps in args.steps:
        target = solve(parts, options, problem, steps, options.teacher_spacing, args.chunk)
        rows.append(dict(what=f"target: {options.teacher_solver}, {options.teacher_spacing}", steps=steps,
                         teacher_evals=steps + evals_extra,
                         **dict(zip(("rel_rms", "mean_rel"), errors(target, reference)))))
        print(f"  {steps} steps done ({time.time() - start:.0f}s)", file=sys.stderr)
    if args.run is not None:
        estimate, form = map_estimate(args.run, problem, args.chunk)
        rows.append(dict(what=f"the run's flow map ({form}, EMA), one jump", steps=1, teacher_evals=0,
                         **dict(zip(("rel_rms", "mean_rel"), errors(estimate, reference)))))

    print(f"\n{args.examples} training pairs of {'run ' + args.run if args.run else 'the digits preset'} "
          f"(teacher {parts.info['teacher']}, {parts.info['schedule']}, {parts.info['prediction_type']}, guidance "
          f"{parts.info['guidance']}; time pairs {options.time_pairs}); reference: {args.reference_steps} "
          f"{options.teacher_solver} log-SNR steps; teacher evaluations per example x{guided} UNet passes with "
          f"guidance. {time.time() - start:.0f}s.\n")
    print("| what | steps | teacher evals / example | rel. RMS error | mean per-example rel. error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['steps']} | {r['teacher_evals']} | {100 * r['rel_rms']:.3f}% | "
              f"{100 * r['mean_rel']:.3f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
