"""What a failed save prints: only the one error line. TensorStore's writes still in flight when Orbax closes its
event loop call back into it and each raises "Event loop is closed" inside `call_soon_threadsafe`, which Python
reports through `sys.unraisablehook` with no object: on a 40 MiB tmpfs a disk-full save printed 140-380 such
tracebacks in about one run of three, before the error line (0 in 6 runs with this hook). A Checkpointer installs,
from its creation, a narrow hook that sends exactly those to the debug log and passes everything else on.
Reproduced here in a subprocess (the hook is process-wide), with the same unraisable report the C callback makes."""

import subprocess
import sys
import textwrap


def test_closed_loop_callbacks_are_dropped_and_other_unraisables_pass(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, sys
        import _testcapi  # CPython's own way to report an unraisable error, as a C callback does
        from flowmap_jax.training import checkpointing

        checkpointing.Checkpointer({str(tmp_path / "ckpt")!r}, keep=1, async_save=False)
        loop = asyncio.new_event_loop()
        loop.close()
        try:
            loop.call_soon_threadsafe(print)
        except RuntimeError as error:  # the C caller's traceback starts in call_soon_threadsafe
            _testcapi.write_unraisable_exc(error.with_traceback(error.__traceback__.tb_next), None, None)
        try:
            raise ValueError("an unrelated error")
        except ValueError as error:
            _testcapi.write_unraisable_exc(error, None, None)  # printed by the previous hook
        print("done")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Event loop is closed" not in done.stderr
    assert "an unrelated error" in done.stderr and "done" in done.stdout
