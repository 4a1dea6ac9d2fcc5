"""Peak memory of `python -m flowmap_jax.write_shards` against the number of images (issue 12).

    python benchmarks/shard_memory.py                          # 200 and 1000 captioned 128 px images
    python benchmarks/shard_memory.py --sizes 100,400 --image-size 64

Writes the tiny SD 1.x pipeline of the tests (`tests/sd_pipelines.py`) and captioned random images into a
temporary folder, then runs the real command once per size under `/usr/bin/time -v` (Linux) and reads its
"Maximum resident set size". The writer holds one batch of images (`--batch-size`, default 16) whatever the
dataset size; the table also shows what holding the whole set as float32 pixels, as the writer once did,
would add (N x H x W x 3 x 4 bytes). Prints a markdown table; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib(command: list[str], env: dict) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `command` under /usr/bin/time -v."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if match is None:
        raise RuntimeError("no 'Maximum resident set size' in /usr/bin/time -v output")
    return int(match.group(1)) / 1024, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200,1000", help="numbers of images, comma-separated")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    if not os.path.exists("/usr/bin/time"):
        print("needs /usr/bin/time (GNU time)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    from tests.sd_pipelines import write_captioned_images, write_sd15_pipeline

    sizes = [int(v) for v in args.sizes.split(",")]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pipeline = write_sd15_pipeline(tmp / "pipeline")
        for n in sizes:
            images = write_captioned_images(tmp / f"images_{n}", [f"a photo of thing {i}" for i in range(n)],
                                            size=args.image_size)
            command = [sys.executable, "-m", "flowmap_jax.write_shards", "--out", str(tmp / f"shards_{n}"),
                       "--source", "folder", "--images", str(images), "--pipeline", str(pipeline),
                       "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--device", "cpu"]
            rss, seconds = peak_rss_mib(command, env)
            whole_set = n * args.image_size ** 2 * 3 * 4 / 2**20
            rows.append({"images": n, "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 1),
                         "whole_set_float32_mib": round(whole_set, 1), "command": " ".join(command[1:])})
    print(f"write_shards peak memory, tiny SD 1.x pipeline, {args.image_size} px images, batch {args.batch_size} "
          f"(load average {os.getloadavg()[0]:.1f})\n")
    print("| images | peak RSS (MiB) | seconds | whole set as float32 pixels (MiB) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['images']} | {row['peak_rss_mib']} | {row['seconds']} | {row['whole_set_float32_mib']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
