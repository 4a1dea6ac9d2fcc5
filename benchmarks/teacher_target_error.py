"""The error of the teacher's reference solutions (the `pairs` regression target and the quality benchmark's
reference), against a converged solution of the exact probability-flow ODE (issue 15).

    python benchmarks/teacher_target_error.py                  # the target table (~5 min on 2 CPU cores)
    python benchmarks/teacher_target_error.py --reference-only # the quality benchmark's reference (SD schedule)
    python benchmarks/teacher_target_error.py --ends --steps 4,8,16,32,64,128 --solvers dpmpp_2m,heun,ddim
                                                               # end to end, both directions (issue 28)

Data: every element from the 1-D Gaussian mixture `tests.mixture_reference.MIXTURE` (modes at -1, 0.15,
1.2 of variance 0.01), whose exact denoiser is the teacher (`teacher.gaussian_mixture_teacher_fn`, JAX,
float32). The converged solution is scipy's DOP853 at rtol 1e-10 in the angle theta
(`tests.mixture_reference.mixture_flow`, float64, independent of the library).

Target table: for each schedule (DDPM linear, scaled_linear (SD), squaredcos_cap_v2; VP cosine up to
alpha = 0; rectified flow), `--examples` training pairs (s, t) drawn by `time_pairs.sample_time_pairs`
with the default `TimePairConfig` plus p_noise = 0.25 and bidirectional (so both ends of the schedule are
in the mix), the source clipped as `pairs` clips it; x_s = alpha_s x0 + sigma_s eps with x0 from the
mixture. Error: RMS(target - exact) / RMS(exact) over all elements, and the 99th percentile of the
per-example relative error. Teacher evaluations per example: DPM-Solver++(2M) and DDIM one per step,
Heun two per step, plus one for DDPM's final DDIM step from t = 0 into [-1, 0) (`samplers.teacher_solve`).

Ends table (`--ends`, alone): `teacher_solve` from one end of each schedule to the other, `--directions`
invert (data to noise: x0 from the mixture at t_clean, solved to t_noise) and generate (noise to data:
the exact solution's x at t_noise solved back to t_clean), 8 x 64 mixture elements, every `--solvers` and
`--steps` on the `--spacings` grids (default here: logsnr). Issue 28: on DDPM the step from t = -1 to 0
left a fixed error, so more steps gave a worse answer from data to noise.

Reference table (`--reference-only`, also printed by default): benchmarks/quality_vs_steps.py's MSE
reference is 100 DPM-Solver++(2M) steps on the uniform grid 999 ... -1 of SD's schedule; its error from
the noise end to the clean end on the mixture, against 1000 steps on the same grid and against the exact
solution, and the same on the log-SNR grid (`flow_config.time_grid(spacing="logsnr")`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEDULE_NAMES = ("ddpm_linear", "ddpm_scaled_linear", "ddpm_squaredcos", "vp_cosine", "rectified_flow")
PREDICTION = {"ddpm_linear": "epsilon", "ddpm_scaled_linear": "epsilon", "ddpm_squaredcos": "epsilon",
              "vp_cosine": "v_prediction", "rectified_flow": "flow"}


def make_schedule(name: str):
    from flowmap_jax.spec.schedule import ScheduleConfig

    return {"ddpm_linear": lambda: ScheduleConfig.ddpm(),
            "ddpm_scaled_linear": lambda: ScheduleConfig.ddpm("scaled_linear", 0.00085, 0.012),
            "ddpm_squaredcos": lambda: ScheduleConfig.ddpm("squaredcos_cap_v2"),
            "vp_cosine": lambda: ScheduleConfig.vp_cosine(1000.0),
            "rectified_flow": lambda: ScheduleConfig.rectified_flow(1000.0)}[name]()


def mixture_teacher(schedule, prediction_type):
    import jax.numpy as jnp

    from flowmap_jax.core import teacher as jt
    from tests.mixture_reference import mixture_params

    params = {k: jnp.asarray(v) for k, v in mixture_params().items()}
    return jt.Teacher.create(jt.gaussian_mixture_teacher_fn(schedule, prediction_type), params, schedule,
                             prediction_type)


def pair_problem(schedule, examples: int, dim: int, seed: int = 0, p_noise: float = 0.25,
                 bidirectional: bool = True):
    """(x_s (B, dim) float32, s (B,), t (B,)) float32 numpy: training pairs as `pairs` draws them."""
    import jax
    import numpy as np
    from flowmap_jax.spec.time_pairs import TimePairConfig

    from flowmap_jax.core import time_pairs
    from tests.mixture_reference import alpha_sigma, sample_mixture

    config = TimePairConfig(p_noise=p_noise, bidirectional=bidirectional)
    s, t = time_pairs.sample_time_pairs(jax.random.key(seed), examples, schedule, config)
    lo = max(schedule.t_eval_min, schedule.t_clean + 1e-3 * schedule.time_unit)  # objectives._eval_range
    s = np.clip(np.asarray(s), lo, schedule.t_noise).astype(np.float32)
    t = np.asarray(t, np.float32)
    rng = np.random.default_rng(seed)
    x0 = sample_mixture(rng, (examples, dim))
    a, sg = alpha_sigma(schedule, s)
    x_s = (a[:, None] * x0 + sg[:, None] * rng.normal(size=x0.shape)).astype(np.float32)
    return x_s, s, t


def teacher_evaluations(schedule, solver: str, steps: int) -> int:
    per_step = 2 if solver == "heun" else 1
    return per_step * steps + (1 if schedule.t_eval_min > schedule.t_clean else 0)


def solve_targets(teacher, x_s, s, t, steps, solver="dpmpp_2m", spacing="logsnr", lower_order_final=False):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flowmap_jax.core import samplers

    fn = jax.jit(lambda tch, x, s, t: samplers.teacher_solve(tch, x, s, t, steps, solver, spacing=spacing,
                                                             lower_order_final=lower_order_final))
    return np.asarray(fn(teacher, jnp.asarray(x_s), jnp.asarray(s), jnp.asarray(t)), np.float64)


def errors(target, exact):
    import numpy as np

    from tests.mixture_reference import rel_rms

    per_example = np.sqrt(np.mean((target - exact) ** 2, axis=1) / np.maximum(np.mean(exact ** 2, axis=1), 1e-12))
    return rel_rms(target, exact), float(np.percentile(per_example, 99)), bool(np.all(np.isfinite(target)))


def target_table(names, steps_list, spacings, solvers, examples, dim, lof_options=(True,)):
    from tests.mixture_reference import mixture_flow

    rows = []
    for name in names:
        schedule = make_schedule(name)
        teacher = mixture_teacher(schedule, PREDICTION[name])
        x_s, s, t = pair_problem(schedule, examples, dim)
        t0 = time.perf_counter()
        exact = mixture_flow(schedule, x_s, s, t)
        print(f"# {name}: exact solution of {examples} pairs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        for solver in solvers:
            for spacing in spacings:
                for lof in lof_options:
                    for steps in steps_list:
                        target = solve_targets(teacher, x_s, s, t, steps, solver, spacing, lof)
                        rms, p99, finite = errors(target, exact)
                        rows.append({"schedule": name, "solver": solver, "spacing": spacing,
                                     "lower_order_final": lof, "steps": steps,
                                     "nfe": teacher_evaluations(schedule, solver, steps), "rel_rms": rms, "p99": p99,
                                     "finite": finite})
                        print(f"{name} {solver} {spacing} lof={lof} {steps}: {rms:.4g} (p99 {p99:.3g})",
                              file=sys.stderr)
    return rows


def ends_table(names, steps_list, spacings, solvers, directions, batch: int = 8, dim: int = 64, seed: int = 0):
    """teacher_solve between the ends of each schedule (see the module docstring), one row per case."""
    import numpy as np

    from tests.mixture_reference import mixture_flow, rel_rms, sample_mixture

    rows = []
    for name in names:
        schedule = make_schedule(name)
        teacher = mixture_teacher(schedule, PREDICTION[name])
        x0 = sample_mixture(np.random.default_rng(seed), (batch, dim)).astype(np.float32)
        x_noise = mixture_flow(schedule, x0, schedule.t_clean, schedule.t_noise).astype(np.float32)
        ones = np.ones(batch, np.float32)
        cases = {"invert": (x0, schedule.t_clean, schedule.t_noise, x_noise),
                 "generate": (x_noise, schedule.t_noise, schedule.t_clean, None)}
        for direction in directions:
            x_s, s, t, exact = cases[direction]
            exact = mixture_flow(schedule, x_s, s, t) if exact is None else exact
            for solver in solvers:
                for spacing in spacings:
                    for steps in steps_list:
                        target = solve_targets(teacher, x_s, s * ones, t * ones, steps, solver, spacing)
                        rows.append({"schedule": name, "direction": direction, "solver": solver, "spacing": spacing,
                                     "steps": steps, "rel_rms": rel_rms(target, exact),
                                     "finite": bool(np.all(np.isfinite(target)))})
                        print(f"{name} {direction} {solver} {spacing} {steps}: {rows[-1]['rel_rms']:.4g}",
                              file=sys.stderr)
    return rows


def print_ends_table(rows):
    """One line per (schedule, direction, solver, spacing), one column per step count."""
    steps = sorted({r["steps"] for r in rows})
    print("| schedule | direction | solver | spacing | " + " | ".join(f"{n} steps" for n in steps) + " |")
    print("|---|---|---|---|" + "---|" * len(steps))
    keys = list(dict.fromkeys((r["schedule"], r["direction"], r["solver"], r["spacing"]) for r in rows))
    for key in keys:
        cells = {r["steps"]: r for r in rows if (r["schedule"], r["direction"], r["solver"], r["spacing"]) == key}
        values = [f"{cells[n]['rel_rms']:.2e}" + ("" if cells[n]["finite"] else " (nan)") if n in cells else ""
                  for n in steps]
        print("| " + " | ".join(key) + " | " + " | ".join(values) + " |")


def reference_table(dim: int = 2048, seed: int = 0):
    """The quality benchmark's 100-step reference on SD's schedule, noise end to clean end."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flowmap_jax.spec.time_grid import time_grid

    from flowmap_jax.core import samplers
    from tests.mixture_reference import mixture_flow, rel_rms

    schedule = make_schedule("ddpm_scaled_linear")
    teacher = mixture_teacher(schedule, "epsilon")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, dim // 8)).astype(np.float32)  # noise at t = 999, as the benchmark's init
    exact = mixture_flow(schedule, x, schedule.t_noise, schedule.t_clean)
    rows, solutions = [], {}
    for solver in ("dpmpp_2m", "ddim", "heun"):
        for spacing in ("uniform", "logsnr"):
            for steps in (100, 1000):
                grid = jnp.asarray(time_grid(schedule, steps, spacing=spacing), jnp.float32)
                run = jax.jit(lambda tch, x, g: samplers.teacher_sample(tch, x, g, solver))  # noqa: B023
                solutions[solver, spacing, steps] = np.asarray(run(teacher, jnp.asarray(x), grid), np.float64)
    for (solver, spacing, steps), sol in solutions.items():
        rows.append({"solver": solver, "spacing": spacing, "steps": steps, "vs_exact": rel_rms(sol, exact),
                     "vs_1000": rel_rms(sol, solutions[solver, "uniform", 1000]),
                     "mse_vs_exact": float(np.mean((sol - exact) ** 2))})
    return rows


def print_target_table(rows):
    print("| schedule | solver | spacing | lower_order_final | steps | teacher evals / example | "
          "rel. RMS error | p99 per-example | finite |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['solver']} | {r['spacing']} | {r['lower_order_final']} | {r['steps']} | "
              f"{r['nfe']} | {r['rel_rms']:.3%} | {r['p99']:.3%} | {r['finite']} |")


def print_reference_table(rows):
    print("| solver | grid | steps | rel. RMS error vs exact | rel. RMS vs 1000 uniform steps | MSE vs exact |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['solver']} | {r['spacing']} | {r['steps']} | {r['vs_exact']:.3e} | {r['vs_1000']:.3e} | "
              f"{r['mse_vs_exact']:.3e} |")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedules", default=",".join(SCHEDULE_NAMES))
    p.add_argument("--steps", default="4,8,16,24,32")
    p.add_argument("--spacings", default="uniform,karras,logsnr")
    p.add_argument("--solvers", default="dpmpp_2m")
    p.add_argument("--lower-order-final", default="false,true",
                   help="teacher_solve's lower_order_final (diffusers' rule: the last step first order below 15 "
                        "steps): false (teacher_solve's default), true, or both")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--dim", type=int, default=16, help="mixture elements per example")
    p.add_argument("--reference-only", action="store_true")
    p.add_argument("--ends", action="store_true", help="only the ends table: teacher_solve from one end of each "
                   "schedule to the other (--spacings defaults to logsnr here)")
    p.add_argument("--directions", default="invert,generate",
                   help="with --ends: invert (data to noise), generate (noise to data), or both")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")
    if args.ends:
        spacings = "logsnr" if args.spacings == build_parser().get_default("spacings") else args.spacings
        directions = args.directions.split(",")
        unknown = sorted(set(directions) - {"invert", "generate"})
        if unknown:
            raise SystemExit(f"--directions: unknown {unknown}; expected invert and/or generate")
        print_ends_table(ends_table(args.schedules.split(","), [int(v) for v in args.steps.split(",")],
                                    spacings.split(","), args.solvers.split(","), directions))
        return 0
    if not args.reference_only:
        lofs = tuple(v.strip().lower() == "true" for v in args.lower_order_final.split(","))
        rows = target_table(args.schedules.split(","), [int(v) for v in args.steps.split(",")],
                            args.spacings.split(","), args.solvers.split(","), args.examples, args.dim, lofs)
        print_target_table(rows)
        print()
    print_reference_table(reference_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
