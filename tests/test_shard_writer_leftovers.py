"""`write_shards` killed with -9 leaves its temporary folder (`.NAME.tmp-PID@HOST.*`, partial shards) beside
--out; the next writer of the same --out removes the temporary folders of writers that are gone (their pid
named in the folder's name no longer runs on this host), and keeps a live writer's and another host's."""

import os
import signal
import socket
import subprocess
import sys

import numpy as np

from flowmap_jax.data import shard_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_rerun_removes_the_temporary_folder_of_a_killed_writer_and_keeps_a_live_ones(tmp_path):
    out = tmp_path / "shards"
    killed = subprocess.run([sys.executable, "-c", f"""
import os, numpy as np
from flowmap_jax.data.shard_writer import ShardWriter
writer = ShardWriter({str(out)!r}, 8, shard_size=4, dtype="float32")
writer.add(np.zeros((6, 2, 2, 1), np.float32))
os.kill(os.getpid(), 9)
"""], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [left] = [name for name in os.listdir(tmp_path) if name.startswith(".shards.tmp-")]
    assert os.listdir(tmp_path / left)  # partial shards
    live = tmp_path / f".shards.tmp-{os.getpid()}@{socket.gethostname()}.abcd1234"
    elsewhere = tmp_path / f".shards.tmp-12345@another-host.abcd1234"
    live.mkdir()
    elsewhere.mkdir()

    shard_writer.write_shards(str(out), np.ones((8, 2, 2, 1), np.float32), shard_size=4, dtype="float32")
    assert sorted(os.listdir(tmp_path)) == sorted(["shards", live.name, elsewhere.name])
    assert (out / "index.json").is_file()
