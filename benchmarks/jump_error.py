"""Where an N-jump flow-map sample loses fidelity: the error of each jump against the teacher's ODE.

For the N-jump time grid (uniform "trailing" grid of the teacher's schedule, as the samplers use) the
reference path is the teacher's PF-ODE solved segment by segment with `--segment-steps` DPM-Solver++(2M)
steps each, from the same noise as `quality_vs_steps.py` (seed `--seed`, label i % 10). Per jump k it
prints:
- local MSE: one flow-map jump X(ref_k, t_k, t_k+1), and one teacher DDIM step over the same segment,
  against ref_k+1 (both start from the reference);
- chain MSE: the N-jump sampler and N-step DDIM so far, against ref_k+1 (errors accumulated).

    python benchmarks/jump_error.py --run runs/long --jumps 8 --num-samples 200    # ~3 min on 2 CPU cores

Samples: (B, H, W, C) float32; times in the teacher's units (t = -1 the clean end of a DDPM schedule).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_vs_steps import (
    baked_guidance,
    default_guidance,
    evaluation_inputs,
    load_teacher,
    resolve_model,
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None, help="a training run folder (its export/ is used)")
    p.add_argument("--model", default=None, help="an exported flow-map folder (flowmap.json)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the shipped digits teacher)")
    p.add_argument("--jumps", type=int, default=8, help="number of jumps N (default 8)")
    p.add_argument("--num-samples", type=int, default=200, help="samples (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--segment-steps", type=int, default=40,
                   help="DPM-Solver++(2M) steps per segment of the reference path (default 40)")
    args = p.parse_args(argv)
    if args.jumps < 1 or args.num_samples < 1 or args.segment_steps < 1:
        raise SystemExit("--jumps, --num-samples and --segment-steps must be >= 1")
    model_dir = resolve_model(args.run, args.model)
    if model_dir is None:
        raise SystemExit("give --run RUN_DIR or --model EXPORT; see --help")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from flowmap_jax.core import samplers
    from flowmap_jax.digits import TEACHER_DIR
    from flowmap_jax.core.export_loading import jax_flow_map, load_flow_map_export
    from flowmap_jax.spec.time_grid import time_grid

    started = time.perf_counter()
    exported = load_flow_map_export(model_dir, dtype=np.float32)
    guidance = baked_guidance(exported, model_dir)
    guidance = default_guidance() if guidance is None else guidance  # as quality_vs_steps.py chooses it
    flow_map = jax_flow_map(exported, jit=False)
    params = jax.device_put(exported.params)
    teacher, table, schedule, unet_config = load_teacher(Path(args.teacher or TEACHER_DIR), guidance)
    if flow_map.schedule != schedule:
        raise SystemExit("the flow map's schedule differs from the teacher's: pass its teacher with --teacher")
    n = args.num_samples
    noise, labels = evaluation_inputs(unet_config, table, n, args.seed)
    cond = {"encoder_hidden_states": jnp.asarray(table[labels][:, None, :])}

    grid = np.asarray(time_grid(schedule, args.jumps), np.float64)
    dpm = jax.jit(lambda x, g: samplers.SOLVERS["dpmpp_2m"](teacher, x, g, cond=cond))
    ddim = jax.jit(lambda x, g: samplers.SOLVERS["ddim"](teacher, x, g, cond=cond))
    jump = samplers.make_jump(flow_map)

    def flow_jump(x, s, t):
        return jump(params, x, jnp.full((n,), s, jnp.float32), jnp.full((n,), t, jnp.float32), cond)

    x_ref = x_map = x_ddim = jnp.asarray(noise)
    print(f"{args.jumps}-jump grid {[round(float(g), 1) for g in grid]}; {n} samples, seed {args.seed}, "
          f"guidance {guidance:g}; reference: {args.segment_steps} DPM-Solver++(2M) steps per segment\n")
    print("| jump | local MSE, flow map | local MSE, DDIM step | chain MSE, flow map | chain MSE, DDIM |")
    print("|---|---|---|---|---|")
    for k in range(args.jumps):
        s, t = float(grid[k]), float(grid[k + 1])
        fine = jnp.asarray(np.linspace(s, t, args.segment_steps + 1), jnp.float32)
        one_step = jnp.asarray([s, t], jnp.float32)
        local_map, local_ddim = flow_jump(x_ref, s, t), ddim(x_ref, one_step)
        x_map, x_ddim = flow_jump(x_map, s, t), ddim(x_ddim, one_step)
        x_ref = dpm(x_ref, fine)

        errors = [float(jnp.mean(jnp.square(a - x_ref))) for a in (local_map, local_ddim, x_map, x_ddim)]
        print(f"| {s:.1f} -> {t:.1f} | " + " | ".join(f"{e:.3e}" for e in errors) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
