"""Training-step throughput of `python -m flowmap_jax.train` on 1 device and on N simulated CPU devices (issue 4).

    python benchmarks/train_throughput.py                        # digits preset, 1 and 8 devices, 60 steps each
    python benchmarks/train_throughput.py --devices 1,2,4,8 --steps 100
    python benchmarks/train_throughput.py -- --objective.names eulerian   # extra flags go to the trainer
    python benchmarks/train_throughput.py --pipeline tiny-sd15   # the sd15 preset on the tiny SD 1.5 pipeline

`--pipeline tiny-sd15` measures the sd15 preset's step (pairs with 8-step targets, CFG teacher, bf16, remat) on
the tiny SD 1.5 pipeline of the tests instead of digits, set up as README.md's "Stable Diffusion" section does
at tiny size, in a temporary folder, nothing downloaded: `tests.sd_pipelines.write_sd15_pipeline` writes the
pipeline (random weights, 32 px images, 8x8x4 latents, CLIP text dim 16), `write_captioned_images` 16 captioned
images, `python -m flowmap_jax.write_shards --source folder --pipeline ... --image-size 32` their latents and
text embeddings; then `python -m flowmap_jax.train --preset sd15 --teacher.path ... --data.path ...
--data.sample_shape 8,8,4 --data.image_size 32 --data.batch_size 8 --optim.warmup_steps 1`, with the same
`--steps` and `--log-every` as digits. One run takes 1-1.5 minutes on 2 idle cores, almost all of it start-up,
compilation and the end's sample grid (not in the measured windows); the set-up (about 10 s) is not timed.

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

PIPELINES = ("digits", "tiny-sd15")
"""--pipeline choices: the digits preset (the trainer's default) or the sd15 preset on the tiny SD 1.5 pipeline."""
TINY_SD15_BATCH = 8  # the global batch of the tiny-sd15 runs: divisible by 8 devices
TINY_SD15_CAPTIONS = ["a photo of a cat", "two dogs on grass", "a red car", "the sea at night"] * 4  # README's 16


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


def tiny_sd15_setup_commands(folder) -> list[list[str]]:
    """The commands (run from the repository root) that write the tiny SD 1.5 pipeline, 16 captioned images
    and their latent shards under `folder`, as README.md's tiny-size Stable Diffusion section does."""
    folder = Path(folder)
    pipeline, images, shards = folder / "tiny_sd15", folder / "images", folder / "shards"
    script = ("from tests.sd_pipelines import write_captioned_images, write_sd15_pipeline\n"
              f"write_sd15_pipeline({str(pipeline)!r})\n"
              f"write_captioned_images({str(images)!r}, {TINY_SD15_CAPTIONS!r})")
    return [[sys.executable, "-c", script],
            [sys.executable, "-m", "flowmap_jax.write_shards", "--out", str(shards), "--source", "folder",
             "--images", str(images), "--pipeline", str(pipeline), "--image-size", "32"]]


def tiny_sd15_trainer_flags(folder) -> list[str]:
    """The trainer's flags for the sd15 preset on the tiny pipeline and shards that `tiny_sd15_setup_commands`
    writes under `folder` (README.md's tiny-size command, at batch TINY_SD15_BATCH)."""
    folder = Path(folder)
    return ["--preset", "sd15", "--teacher.path", str(folder / "tiny_sd15"), "--data.path", str(folder / "shards"),
            "--data.sample_shape", "8,8,4", "--data.image_size", "32", "--data.batch_size", str(TINY_SD15_BATCH),
            "--optim.warmup_steps", "1"]


def child_env(devices: int = 1) -> dict:
    """The environment of a child process: `devices` simulated CPU devices, the CPU backend, the repository on
    PYTHONPATH, the Hugging Face hub offline (nothing is downloaded)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    # Ours first: XLA stops reading at a token that is not a flag (tests/conftest.py passes one).
    env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}"] + flags)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["HF_HUB_OFFLINE"] = "1"
    return env


def prepare_tiny_sd15(folder) -> None:
    """Runs `tiny_sd15_setup_commands(folder)`; a failing one raises SystemExit with its output's tail."""
    for cmd in tiny_sd15_setup_commands(folder):
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=child_env(1), capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise SystemExit(f"train_throughput: setting up the tiny SD 1.5 pipeline failed "
                             f"({' '.join(cmd[1:3])}..., exit {proc.returncode}): {tail}")


def run_one(devices: int, args, extra: list[str]) -> dict:
    env = child_env(devices)
    with tempfile.TemporaryDirectory(prefix=f"throughput_{devices}_") as run_dir:
        cmd = trainer_command(run_dir, args.steps, args.log_every, extra)
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"devices": devices, "pipeline": args.pipeline,
                    "error": f"trainer exit {proc.returncode}: " + " | ".join(tail)}
        records = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line]
        config = json.loads(Path(run_dir, "config.json").read_text())
    rate, windows = steady_rate(records)
    batch = int(config.get("data", {}).get("batch_size", 0)) or None
    return {"devices": devices, "pipeline": args.pipeline, "steps_per_s": rate,
            "examples_per_s": rate * batch if batch else None, "global_batch": batch, "windows": windows,
            "wall_s": seconds}


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["devices"] == 1 and "steps_per_s" in r), None)
    lines = ["| devices | global batch | per-device batch | steps/s | examples/s | vs 1 device | pipeline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pipeline = r.get("pipeline", "digits")
        if "error" in r:
            lines.append(f"| {r['devices']} | | | {r['error']} | | | {pipeline} |")
            continue
        per_device = r["global_batch"] // r["devices"] if r["global_batch"] else "?"
        ratio = f"{r['steps_per_s'] / base['steps_per_s']:.2f}" if base else "-"
        lines.append(f"| {r['devices']} | {r['global_batch']} | {per_device} | {r['steps_per_s']:.3f} | "
                     f"{r['examples_per_s']:.1f} | {ratio} | {pipeline} |")
    return "\n".join(lines)


def parse_args(argv=None):
    """(args, extra trainer flags): the flags after `--` go to the trainer unchanged (after the tiny-sd15
    flags, so they override them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python benchmarks/train_throughput.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", choices=PIPELINES, default="digits",
                   help="what is trained: digits (the default preset) or tiny-sd15 (the sd15 preset on the tiny SD 1.5 "
                        "pipeline of tests/sd_pipelines.py, written to a temporary folder)")
    p.add_argument("--devices", type=parse_counts, default=(1, 8), help="device counts (default 1,8)")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    p.add_argument("--log-every", type=int, default=10, help="steps per timing window (default 10)")
    p.add_argument("--json", default=None, help="write the rows here as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.log_every < 1:
        p.error("--steps and --log-every must be >= 1")
    if args.steps < 2 * args.log_every:
        p.error(f"--steps {args.steps} must cover at least two --log-every {args.log_every} windows (the first is "
                f"compilation)")
    if args.pipeline == "tiny-sd15":
        uneven = [n for n in args.devices if TINY_SD15_BATCH % n]
        if uneven and not any(flag.startswith("--data.batch_size") for flag in extra):
            p.error(f"--devices {','.join(map(str, uneven))}: the tiny-sd15 batch {TINY_SD15_BATCH} is not divisible "
                    f"by it (pass -- --data.batch_size B)")
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="throughput_setup_") as folder:
        trainer_flags = list(extra)
        if args.pipeline == "tiny-sd15":
            print("writing the tiny SD 1.5 pipeline, 16 captioned images and their shards ...", file=sys.stderr,
                  flush=True)
            prepare_tiny_sd15(folder)
            trainer_flags = tiny_sd15_trainer_flags(folder) + trainer_flags
        for devices in args.devices:
            print(f"{devices} device(s): training {args.steps} steps ...", file=sys.stderr, flush=True)
            rows.append(run_one(devices, args, trainer_flags))
    what = {"digits": "(digits preset)", "tiny-sd15": "--preset sd15 on the tiny SD 1.5 pipeline (8x8x4 latents, "
                                                      f"batch {TINY_SD15_BATCH})"}[args.pipeline]
    print(f"python -m flowmap_jax.train {what}{' ' + ' '.join(extra) if extra else ''}; {args.steps} steps, median "
          f"of {args.log_every}-step windows after the first; {os.cpu_count()} CPU(s), load average {load_start:.1f} "
          f"at start, {os.getloadavg()[0]:.1f} at end; {time.perf_counter() - started:.0f}s in all\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"pipeline": args.pipeline, "rows": rows, "extra_flags": extra,
                                               "steps": args.steps, "log_every": args.log_every}, indent=2))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
