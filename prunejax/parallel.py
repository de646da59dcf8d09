"""Data parallelism with ``jit`` and ``NamedSharding`` on a one-axis ``data`` mesh.

Parameters and optimizer state are replicated; every batch array is split along its first axis over
all devices (of all processes). XLA inserts the gradient all-reduce, so a sharded step computes the
same global mean loss as one device would.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prunejax.errors import ConfigError

DATA_AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (all global devices by default)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "batch_size") -> int:
  """The global batch must split evenly over the mesh (padding rows make that always possible)."""
  n = mesh.devices.size
  if batch_size < n or batch_size % n:
    raise ConfigError(f"{field}={batch_size} must be a positive multiple of the number of devices "
                      f"({n})")
  return batch_size


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh``."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Splits a host batch along its first axis over the mesh.

  With one process the host batch is the global batch. With several processes each passes its own
  rows (its slice of the global batch, in process order) and gets a global array back.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def gather(x: jax.Array) -> np.ndarray:
  """A (possibly sharded, possibly multi-process) array as one host NumPy array on every process."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, cpu_collectives: str = "gloo") -> None:
  """Starts JAX's distributed runtime when more than one process is asked for.

  Arguments default to the environment (``PRUNEJAX_COORDINATOR``, ``PRUNEJAX_NUM_PROCESSES``,
  ``PRUNEJAX_PROCESS_ID``); on TPU pods and SLURM clusters, where JAX detects all three, pass
  ``num_processes=-1`` (or set ``PRUNEJAX_NUM_PROCESSES=-1``) to use JAX's own detection. CPU processes
  use ``cpu_collectives`` (gloo) for cross-process reductions.
  """
  import os
  coordinator_address = coordinator_address or os.environ.get("PRUNEJAX_COORDINATOR")
  if num_processes is None and os.environ.get("PRUNEJAX_NUM_PROCESSES"):
    num_processes = int(os.environ["PRUNEJAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("PRUNEJAX_PROCESS_ID"):
    process_id = int(os.environ["PRUNEJAX_PROCESS_ID"])
  if num_processes is None or num_processes == 1:
    return
  if num_processes == -1:
    jax.distributed.initialize()
    return
  if not coordinator_address or process_id is None:
    raise ConfigError("num_processes > 1 needs coordinator_address (host:port) and process_id")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"process_id={process_id} is out of range; expected 0..{num_processes - 1}")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def barrier(name: str) -> None:
  """Waits for every process (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
