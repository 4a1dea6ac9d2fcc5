"""Multi-process start-up: `jax.distributed.initialize` from flags or environment variables.

One process per host (or, for tests, several CPU processes on one machine), the same program in
each. Resolution order for each value: the flag (`--distributed.coordinator_address`,
`--distributed.num_processes`, `--distributed.process_id`), then the environment
(`COORDINATOR_ADDRESS` / `JAX_COORDINATOR_ADDRESS`, `NUM_PROCESSES` / `JAX_NUM_PROCESSES`,
`PROCESS_ID` / `JAX_PROCESS_ID`). With none of them set the run is single-process and nothing is
initialised; `--distributed.auto true` calls `jax.distributed.initialize()` with no arguments so
JAX detects the cluster itself (SLURM, Open MPI, Cloud TPU, Kubernetes...).

On CPU, cross-process collectives need `jax_cpu_collectives_implementation = "gloo"`, set here
before initialising (harmless on GPU/TPU). Call `initialize` before anything touches a jax device.
After it, `jax.devices()` lists every process's devices and `jax.local_devices()` this process's;
each process loads only its own rows of every batch (`datasets.BatchStream`) and hands them to
`jax.make_array_from_process_local_data` (`sharding.put_batch`).
"""

from __future__ import annotations

import dataclasses
import os

import jax

_ENV = {
    "coordinator_address": ("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("PROCESS_ID", "JAX_PROCESS_ID"),
}


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits: index in 0..count-1 and count."""

    index: int
    count: int

    @property
    def is_main(self) -> bool:
        return self.index == 0


def _from_env(name: str, environ) -> str | None:
    for var in _ENV[name]:
        if environ.get(var, "") != "":
            return environ[var]
    return None


def resolve(config, environ=None) -> dict | None:
    """The arguments for `jax.distributed.initialize` from a `config.DistributedConfig` and the
    environment, or None for a single-process run. Raises ValueError naming what is missing."""
    environ = os.environ if environ is None else environ
    address = config.coordinator_address or _from_env("coordinator_address", environ) or ""
    count = config.num_processes or int(_from_env("num_processes", environ) or 0)
    pid = config.process_id if config.process_id >= 0 else int(_from_env("process_id", environ) or -1)
    if not address and count <= 1 and pid <= 0:
        return None
    missing = [name for name, ok in (("--distributed.coordinator_address / COORDINATOR_ADDRESS", bool(address)),
                                     ("--distributed.num_processes / NUM_PROCESSES", count >= 1),
                                     ("--distributed.process_id / PROCESS_ID", pid >= 0)) if not ok]
    if missing:
        raise ValueError("multi-process run needs " + ", ".join(missing))
    if not 0 <= pid < count:
        raise ValueError(f"process id {pid} is outside 0..{count - 1}")
    return {"coordinator_address": address, "num_processes": count, "process_id": pid}


def initialize(config, environ=None) -> ProcessInfo:
    """Start JAX's multi-process runtime if the flags or environment ask for it. Idempotent."""
    if jax.distributed.is_initialized():
        return ProcessInfo(jax.process_index(), jax.process_count())
    if config.auto:
        _use_gloo_on_cpu()
        jax.distributed.initialize()
        return ProcessInfo(jax.process_index(), jax.process_count())
    kwargs = resolve(config, environ)
    if kwargs is None:
        return ProcessInfo(0, 1)
    _use_gloo_on_cpu()
    jax.distributed.initialize(**kwargs)
    return ProcessInfo(jax.process_index(), jax.process_count())


def _use_gloo_on_cpu() -> None:
    """CPU collectives across processes go through gloo (the default CPU backend has none)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def process_info() -> ProcessInfo:
    return ProcessInfo(jax.process_index(), jax.process_count())


def broadcast_from_main(value):
    """A small host value (numpy pytree) from process 0 to all processes (no-op single-process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)


def sync(name: str) -> None:
    """A barrier across processes (no-op single-process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
