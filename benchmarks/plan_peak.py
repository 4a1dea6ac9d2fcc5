"""What holds the memory at the peak of a compiled XLA program: the values live at the peak of XLA's buffer
assignment, grouped by where they were made (issue 24).

    python benchmarks/sd15_step_plan.py --preset sdxl --mode fsdp --per-device-batch 16 --fast-compile \\
        --peak-report /tmp/sdxl_peak                    # compiles with an XLA dump there, then prints this table
    python benchmarks/plan_peak.py /tmp/sdxl_peak      # the table again, from the dump
    python benchmarks/plan_peak.py DUMP --module jit_step --top 30
    python benchmarks/plan_peak.py --remat-check     # does this backend's compiler keep jax.checkpoint's recompute?

XLA writes, for each compiled module, `*-live-range.txt` (the schedule, each value's live range in it, and the
values live at the peak) and `*after_optimizations.txt` (the HLO, each instruction's `op_name`: JAX's name stack,
e.g. `jit(step)/shard_map/transpose(jvp(FlaxUNet2DConditionModel))/up_blocks_0/.../checkpoint/...`). Each value
live at the peak is put in a group:
- **kind**: "recompute" (`rematted_computation` in its name: a rematerialised layer's forward, run again for the
  backward), "backward" (under `transpose(...)`: a cotangent or a saved forward value of the backward), "forward"
  (anything else: the primal, the teacher, the optimiser), "unnamed" (fusions XLA made without an op_name);
- **where**: the UNet blocks in its name (down_blocks_N, mid_block, up_blocks_N), numbers folded to N.

Each group also gets the median position in the schedule where its values were made, against the peak's: many
recomputed layers live at once, made long before the peak, mean the scheduler ran rematerialised layers early,
which undoes the remat; many backward values of many layers live at once mean the backward's layers overlap.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

__all__ = ["PeakValue", "find_module_files", "peak_values", "group_peak", "peak_table", "remat_check", "main"]

PeakValue = collections.namedtuple("PeakValue", "name size start end op_name")


def find_module_files(dump_dir, module: str = "jit_step") -> tuple[Path, Path]:
    """(live-range file, after-optimisations HLO file) of the module whose name contains `module` (the largest
    if several match). ValueError naming the folder and what is missing."""
    dump_dir = Path(dump_dir)
    if not dump_dir.is_dir():
        raise ValueError(f"plan_peak: {dump_dir} is not a folder (an XLA dump, --xla_dump_to)")
    ranges = sorted(p for p in dump_dir.glob("*-live-range.txt") if module in p.name)
    if not ranges:
        raise ValueError(f"plan_peak: no *-live-range.txt for a module named like {module!r} in {dump_dir}")
    live = max(ranges, key=lambda p: p.stat().st_size)
    hlo = live.with_name(live.name.replace("-live-range.txt", ".txt"))
    if not hlo.is_file():
        raise ValueError(f"plan_peak: {live.name} has no HLO beside it ({hlo.name}) in {dump_dir}")
    return live, hlo


def _op_names(hlo_text: str) -> dict:
    """instruction name -> op_name, a fusion without its own taken from the last named instruction inside."""
    own, calls, inside = {}, {}, {}
    for m in re.finditer(r"\n\s*(?:ROOT )?%(\S+) = ([^\n]*)", hlo_text):
        line = m.group(2)
        name = re.search(r'op_name="([^"]+)"', line)
        if name:
            own[m.group(1)] = name.group(1)
        call = re.search(r"calls=%([^,\s}]+)", line)
        if call:
            calls[m.group(1)] = call.group(1)
    for m in re.finditer(r"\n%(\S+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S):
        names = re.findall(r'op_name="([^"]+)"', m.group(2))
        if names:
            inside[m.group(1)] = names[-1]
    return {n: own.get(n) or inside.get(calls.get(n, ""), "") for n in set(own) | set(calls)}


def peak_values(live_range_file, hlo_file) -> tuple[int, int, list]:
    """(peak position, schedule length, [PeakValue]) from XLA's live-range dump."""
    lines = Path(live_range_file).read_text().split("\n")
    try:
        i_ranges = next(i for i, line in enumerate(lines) if line.strip() == "BufferLiveRange:")
        i_peak = next(i for i, line in enumerate(lines) if "Live ranges at" in line)
    except StopIteration:
        raise ValueError(f"plan_peak: {live_range_file} has no BufferLiveRange / peak section") from None
    i_end = next((i for i, line in enumerate(lines) if "Stack trace breakdown" in line), len(lines))
    peak = int(re.search(r"at (\d+)", lines[i_peak]).group(1))
    length = int((re.search(r"max (\d+)", lines[0]) or re.search(r"(\d+)", "0")).group(1))
    ranges = {}
    for line in lines[i_ranges + 1:i_peak]:
        m = re.match(r"\s+(\S+)\{(.*?)\}:(\d+)-(\d+)", line)
        if m:
            ranges[m.group(1), m.group(2)] = (int(m.group(3)), int(m.group(4)))
    names = _op_names(Path(hlo_file).read_text())
    values = []
    for line in lines[i_peak + 1:i_end]:
        m = re.match(r"\s+(\S+)\{(.*?)\}: (\d+) bytes", line)
        if m:
            start, end = ranges.get((m.group(1), m.group(2)), (-1, -1))
            values.append(PeakValue(m.group(1), int(m.group(3)), start, end, names.get(m.group(1), "")))
    return peak, length, values


def _group(value: PeakValue) -> tuple[str, str]:
    op = value.op_name
    kind = ("unnamed" if not op else "recompute" if "rematted_computation" in op
            else "backward" if "transpose(" in op else "forward")
    blocks = [part for part in op.split("/") if part.startswith(("down_blocks_", "up_blocks_", "mid_block"))]
    where = re.sub(r"_\d+", "_N", blocks[-1]) if blocks else "-"
    return kind, where


def group_peak(values) -> list:
    """[(kind, where, bytes, count, median start position)] largest first."""
    size, starts = collections.Counter(), collections.defaultdict(list)
    for value in values:
        key = _group(value)
        size[key] += value.size
        starts[key].append(value.start)
    return [(*key, size[key], len(starts[key]), sorted(starts[key])[len(starts[key]) // 2])
            for key, _ in size.most_common()]


def peak_table(dump_dir, module: str = "jit_step", top: int = 20) -> str:
    """A markdown table of the groups at the peak of `module` in `dump_dir`, with the total."""
    live, hlo = find_module_files(dump_dir, module)
    peak, length, values = peak_values(live, hlo)
    groups = group_peak(values)
    total = sum(v.size for v in values)
    out = [f"Values live at the peak of {live.name} (position {peak} of {length}): "
           f"{total / 2**30:.2f} GiB in {len(values)} values (arguments included)", "",
           "| kind | where | GiB | values | made at (median position) |", "|---|---|---|---|---|"]
    for kind, where, size, n, start in groups[:top]:
        out.append(f"| {kind} | {where} | {size / 2**30:.2f} | {n} | {start} |")
    if len(groups) > top:
        rest = groups[top:]
        out.append(f"| (other {len(rest)} groups) | | {sum(g[2] for g in rest) / 2**30:.2f} | "
                   f"{sum(g[3] for g in rest)} | |")
    return "\n".join(out)


def remat_check() -> dict:
    """Whether the default backend's compiler keeps a rematerialised recompute: the gradient of
    sum(cos(g(g(x)))), g(x) = sin(sin(x) W) W, compiled with `jax.checkpoint` on g and without. JAX's program with
    remat has 10 matrix products (4 forward, 2 recomputed, 4 backward); if the compiled program with remat has
    no more products than the one without (8), the recompute was merged back into the forward (XLA CPU expands
    the optimisation barriers that keep them apart before its common-subexpression pass) and remat saves nothing
    there. Returns the counts and the verdict."""
    import jax
    import jax.numpy as jnp

    w = jnp.full((64, 64), 0.01, jnp.float32)
    x = jnp.ones((8, 64), jnp.float32)

    def count(layer):
        lowered = jax.jit(jax.grad(lambda v: jnp.sum(jnp.cos(layer(layer(v)))))).lower(x)
        return lowered.as_text().count("stablehlo.dot_general"), lowered.compile().as_text().count(" dot(")

    plain = lambda v: jnp.sin(jnp.sin(v) @ w) @ w
    traced_remat, compiled_remat = count(jax.checkpoint(plain))
    traced_plain, compiled_plain = count(plain)
    return {"backend": jax.default_backend(), "traced_with_remat": traced_remat, "compiled_with_remat": compiled_remat,
            "traced_without": traced_plain, "compiled_without": compiled_plain,
            "remat_kept": compiled_remat > compiled_plain}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/plan_peak.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump", nargs="?", help="an XLA dump folder (--xla_dump_to; sd15_step_plan.py --peak-report DIR)")
    p.add_argument("--remat-check", action="store_true", help="check whether this backend's compiler keeps "
                   "jax.checkpoint's recompute (a toy gradient compiled with and without remat)")
    p.add_argument("--module", default="jit_step", help="the module's name contains this (default jit_step)")
    p.add_argument("--top", type=int, default=20, help="groups to list (default 20)")
    args = p.parse_args(argv)
    if args.remat_check:
        r = remat_check()
        verdict = ("kept: this backend's plans recompute what remat marks" if r["remat_kept"] else
                   "merged back into the forward: this backend's plans keep what remat would recompute")
        print(f"{r['backend']}: matrix products traced {r['traced_with_remat']} with remat / {r['traced_without']} "
              f"without, compiled {r['compiled_with_remat']} / {r['compiled_without']}; the recompute is {verdict}")
        if not args.dump:
            return 0
    if not args.dump:
        p.error("give an XLA dump folder, or --remat-check")
    try:
        print(peak_table(args.dump, args.module, args.top))
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
