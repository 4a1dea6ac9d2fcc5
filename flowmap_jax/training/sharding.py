"""Device mesh and shardings: a data-parallel axis and an optional FSDP axis.

Mesh axes, in this order: `data` (replicas, each with its own slice of the batch) and `fsdp`
(devices that split the parameters and optimiser state between them and also take their own slice
of the batch). The global batch is split over both axes (`BATCH_SPEC`); with `fsdp == 1` the mesh is
pure data parallelism and every parameter is replicated.

FSDP rule (`fsdp_spec`): a parameter with at least `min_size` elements is split along its largest
dimension that the fsdp size divides; anything else (biases, norms, small layers) is replicated.
The training step all-gathers a split parameter inside its per-device code just before use, and the
gradient comes back reduce-scattered (the transpose of the all-gather), so each device only ever
holds its shard of the parameters, gradients and optimiser state between steps.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flowmap_jax.cli.cli_exit import BadInput

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
BATCH_SPEC = P(BATCH_AXES)
"""PartitionSpec of a batch array (B, ...): the leading axis split over every device."""


class MeshError(BadInput, ValueError):
    """--mesh.data x --mesh.fsdp does not fit the devices there are (exit 2); the message names the flag."""


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all processes).

    fsdp == -1 shards over all the devices data leaves (all of them when data is -1 too); data == -1
    takes all devices not used by fsdp. A single process may use its first data * fsdp devices;
    otherwise the sizes must multiply to the device count (MeshError, naming the flag and the count).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp == -1:
        if data != -1 and n % data:
            raise MeshError(f"--mesh.data {data} does not divide the {n} available devices (--mesh.fsdp -1 "
                            f"shards over the devices it leaves)")
        fsdp = n if data == -1 else n // data
    if fsdp < 1 or n % fsdp:
        raise MeshError(f"--mesh.fsdp {fsdp} does not divide the {n} available devices (-1 takes them all)")
    if data == -1:
        data = n // fsdp
    if data * fsdp < n and jax.process_count() == 1:
        devices, n = devices[:data * fsdp], data * fsdp  # a subset of one process's devices
    if data * fsdp != n:
        raise MeshError(f"--mesh.data {data} x --mesh.fsdp {fsdp} = {data * fsdp} but {n} devices are available "
                        f"(use --mesh.data -1 to take all)")
    # jax.make_mesh orders devices for the physical topology (ICI/NVLink); fall back for a subset.
    if devices == list(jax.devices()):
        return jax.make_mesh((data, fsdp), (DATA_AXIS, FSDP_AXIS),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA_AXIS, FSDP_AXIS),
                axis_types=(jax.sharding.AxisType.Auto,) * 2)


def fsdp_spec(shape, fsdp_size: int, min_size: int = 2**18) -> P:
    """PartitionSpec for one parameter of `shape`: split its largest `fsdp_size`-divisible dimension
    over the fsdp axis if it has at least `min_size` elements, else replicate (P())."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for axis in order:
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP_AXIS
            return P(*spec)
    return P()


def param_specs(params, mesh: Mesh, min_size: int = 2**18):
    """A pytree of PartitionSpecs, one per leaf of `params` (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: fsdp_spec(np.shape(x), fsdp_size, min_size), params)


def named(mesh: Mesh, specs):
    """PartitionSpec pytree -> NamedSharding pytree on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every batch array: leading (batch) axis over all devices."""
    return NamedSharding(mesh, BATCH_SPEC)


def num_batch_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def put_batch(mesh: Mesh, local_batch):
    """Process-local batch (numpy pytree, leading axis = this process's share of the global batch)
    -> global jax.Arrays sharded with `batch_sharding`. Every process calls this with its own rows
    (process p holds global rows [p * b, (p + 1) * b)), see `flowmap_jax.data.datasets`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def put_with_specs(mesh: Mesh, tree, specs):
    """Host values (identical on every process) -> global arrays placed with `specs` (a PartitionSpec per leaf):
    each device receives only its slice, so a split tree is never whole on any device."""
    return jax.tree.map(lambda x, spec: jax.make_array_from_process_local_data(
        NamedSharding(mesh, spec), np.asarray(x), np.shape(x)), tree, specs)


def put_replicated(mesh: Mesh, tree):
    """Host values (identical on every process) -> fully replicated global arrays on `mesh`."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
