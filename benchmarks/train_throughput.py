"""Training-step throughput of `python -m flowmap_jax.train` on 1 device and on N simulated CPU devices (issue 4).

    python benchmarks/train_throughput.py                        # digits preset, 1 and 8 devices, 60 steps each
    python benchmarks/train_throughput.py --devices 1,2,4,8 --steps 100
    python benchmarks/train_throughput.py -- --objective.names eulerian   # extra flags go to the trainer

Each device count runs the real trainer in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=N
must be set before jax is imported), with the same global batch, seed and flags: the digits preset by
default (pairs objective, batch 32, CFG teacher), no baseline, no quality table, no export, no persistent
compilation cache, checkpoints only at the end. The throughput is read back from the run's metrics.jsonl
(steps/s between scalar logs, every `--log-every` steps); the first window holds the compilation and is
left out; the median of the rest is reported, with examples/s (global batch x steps/s).

On a CPU the "devices" share the same cores, so N simulated devices measure the cost of the sharded
program (per-device batch B/N, the explicit gradient `pmean`), not a speed-up; on N GPUs the same command
without XLA_FLAGS measures the real thing. Prints a markdown table; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive device counts, got {text!r}")
    return counts


def steady_rate(records: list[dict]) -> tuple[float, int]:
    """(median steps/s, windows used) of metrics.jsonl records, the first window (compilation) left out."""
    rates = [r["steps_per_s"] for r in records[1:] if "steps_per_s" in r]
    if not rates:
        raise ValueError("too few logged windows: raise --steps or lower --log-every")
    return statistics.median(rates), len(rates)


def trainer_command(run_dir: str, steps: int, log_every: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "flowmap_jax.train", "--run.dir", run_dir, "--run.steps", str(steps),
            "--run.log_every", str(log_every), "--run.checkpoint_every", str(10 * steps),
            "--run.quality_samples", "0", "--run.export", "false", "--run.progress_bar", "false",
            "--run.async_checkpoints", "false", "--run.compilation_cache", "", *extra]


def run_one(devices: int, args, extra: list[str]) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory(prefix=f"throughput_{devices}_") as run_dir:
        cmd = trainer_command(run_dir, args.steps, args.log_every, extra)
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"devices": devices, "error": f"trainer exit {proc.returncode}: " + " | ".join(tail)}
        records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line]
        config = json.loads(Path(run_dir, "config.json").read_text())
    rate, windows = steady_rate(records)
    batch = int(config.get("data", {}).get("batch_size", 0)) or None
    return {"devices": devices, "steps_per_s": rate, "examples_per_s": rate * batch if batch else None,
            "global_batch": batch, "windows": windows, "wall_s": seconds}


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["devices"] == 1 and "steps_per_s" in r), None)
    lines = ["| devices | global batch | per-device batch | steps/s | examples/s | vs 1 device |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['devices']} | | | {r['error']} | | |")
            continue
        per_device = r["global_batch"] // r["devices"] if r["global_batch"] else "?"
        ratio = f"{r['steps_per_s'] / base['steps_per_s']:.2f}" if base else "-"
        lines.append(f"| {r['devices']} | {r['global_batch']} | {per_device} | {r['steps_per_s']:.3f} | "
                     f"{r['examples_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=parse_counts, default=(1, 8), help="device counts (default 1,8)")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    p.add_argument("--log-every", type=int, default=10, help="steps per timing window (default 10)")
    p.add_argument("--json", default=None, help="write the rows here as JSON")
    args = p.parse_args(argv)
    if args.steps < 2 * args.log_every:
        raise SystemExit("--steps must cover at least two --log-every windows (the first is compilation)")
    load_start = os.getloadavg()[0]
    rows = []
    for devices in args.devices:
        print(f"{devices} device(s): training {args.steps} steps ...", file=sys.stderr, flush=True)
        rows.append(run_one(devices, args, extra))
    print(f"python -m flowmap_jax.train {' '.join(extra) or '(digits preset)'}; {args.steps} steps, median of "
          f"{args.log_every}-step windows after the first; {os.cpu_count()} CPU(s), load average "
          f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "extra_flags": extra, "steps": args.steps}, indent=2))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
