"""What a run tells its user: progress bar, scalars, sample grids and the quality table.

Only process 0 writes (other processes get a silent `Reporter`). Files under the run folder:
  metrics.jsonl      one JSON object per logged step: {"step", "loss", ..., "steps_per_s", "lr"}
                     (on resume, lines after the restored step are dropped: they are recomputed)
  tensorboard/       TensorBoard event files (tensorboardX), the same scalars
  samples/step_<N>.png  grids: one row per sampler (flow map 1, 2, 4 jumps; teacher 50 steps),
                     the same noise and labels in every row, the row's name on its left
  quality.md, quality.json  the final table (one row per sampler)
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


class Reporter:
    """Progress bar (loss, steps/s, ETA), TensorBoard scalars and metrics.jsonl of a run.

    start_step: the step the run (re)starts from; total_steps: the last step. files=False (the rerun of a
    finished run) writes no file (metrics.jsonl and tensorboard/ untouched); messages still reach stderr.
    """

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress_bar: bool = True, files: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self.total_steps = total_steps
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self.bar = None
        self.writer = None
        self._jsonl = None
        if not enabled or not files:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= start_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (json.JSONDecodeError, KeyError):
                        pass  # a line cut short by a kill
        with open(path, "w") as f:
            f.writelines(kept)
        self._jsonl = open(path, "a")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)

    def step(self, n: int = 1) -> None:
        """Advance the progress bar by n steps."""
        if self.bar is not None:
            self.bar.update(n)

    def scalars(self, step: int, metrics: dict, extra: dict | None = None) -> dict:
        """Log host floats at `step`; returns what was written (with steps/s since the last call)."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, "steps_per_s": rate}
        record.update(extra or {})
        if not self.enabled or self._jsonl is None:
            return record
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}", refresh=False)
        return record

    def message(self, text: str) -> None:
        """A line for the user (above the progress bar)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def image(self, tag: str, path: str, step: int) -> None:
        if self.enabled and self.writer is not None:
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
            self.writer.add_image(tag, array, step, dataformats="HWC")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self._jsonl.close()


def write_quality_table(run_dir: str, rows: list[dict], notes: list[str] | None = None) -> str:
    """quality.json (the rows as they are) and quality.md (a markdown table, columns in the order
    of first appearance; floats with 4 significant digits). Returns the markdown text."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "quality.json"), "w") as f:
        json.dump({"rows": rows, "notes": notes or []}, f, indent=2)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    text = "\n".join(lines + [""] + [f"- {n}" for n in (notes or [])]) + "\n"
    with open(os.path.join(run_dir, "quality.md"), "w") as f:
        f.write(text)
    return text
