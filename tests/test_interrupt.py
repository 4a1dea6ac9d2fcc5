"""Ctrl-C during training always stops the run with exit 130 (issue 28): even when Python swallows the
KeyboardInterrupt, as it does for an exception raised inside a garbage-collection callback (seen with XLA's
`_xla_gc_callback`: "Exception ignored in ... KeyboardInterrupt", and the run went on to the end, exit 0)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from flowmap_jax.training import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_swallowed_ctrl_c_is_raised_again_at_the_next_step():
    # As in a terminal: Python's own handler. (A process started in the background by a non-interactive shell
    # inherits SIGINT ignored, and the guard leaves an ignored signal ignored.)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        guard = checkpointing.PreemptionGuard()
        try:
            assert signal.getsignal(signal.SIGINT) == guard._handle_interrupt
            guard.check_interrupt()  # nothing yet
            try:  # what a garbage-collection callback does to the exception: drops it
                os.kill(os.getpid(), signal.SIGINT)
            except KeyboardInterrupt:
                pass
            with pytest.raises(KeyboardInterrupt):
                guard.check_interrupt()
        finally:
            guard.close()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_gc_callback_during_training_exits_130(tmp_path):
    """A stand-in run (tests/train_support.py) whose Ctrl-C arrives inside a gc callback once the first
    checkpoint exists: Python prints "Exception ignored" and drops the KeyboardInterrupt; the run must still stop
    before its last step, with "interrupted" and exit 130, not finish."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import gc, os, signal, sys
        sys.path.insert(0, {ROOT!r})
        from flowmap_jax.cli import cli_exit
        from tests import train_support

        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started in the background
        marker = os.path.join({str(run_dir)!r}, "checkpoints", "4")
        fired = []

        def ctrl_c_inside_gc(phase, info):
            if not fired and phase == "start" and os.path.isdir(marker):
                fired.append(1)
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, inside the gc callback

        gc.callbacks.append(ctrl_c_inside_gc)
        cli_exit.run_main(lambda: train_support.main(["--run.dir", {str(run_dir)!r}, "--run.steps", "400",
                                                      "--run.checkpoint_every", "4", "--run.quality_samples", "0",
                                                      "--run.export", "false", "--run.async_checkpoints", "false"]))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert "Exception ignored" in proc.stderr, proc.stderr[-2000:]  # the interrupt was swallowed once
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted" in proc.stderr
    assert not os.path.exists(run_dir / "finished.json")
