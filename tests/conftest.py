"""Test set-up, applied before jax is imported: 8 simulated CPU devices, single-threaded XLA and
torch kernels (pytest -n 2 already fills both cores; nested thread pools only oversubscribe them),
and highest matmul precision for parity."""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # the JAX-only tests run without torch
    pass
