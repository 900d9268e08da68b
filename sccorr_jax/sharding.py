"""Devices: the 1-D `('data',)` mesh and host -> global batches, one home for both.

Training, validation, evaluation and the feature cache are data-parallel in one way: a 1-D mesh
with the axis `'data'` (automatic sharding mode), the batch sharded along its first axis and
parameters replicated. On several hosts each process reads its own rows of the data
(`process_index::process_count`), and `global_batch` assembles them into global arrays.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A 1-D `('data',)` mesh (automatic sharding mode).

  Args:
    devices: default every device of every process; a process's own (`jax.local_devices()`)
      for work it does alone (the feature cache).
  """
  auto = (jax.sharding.AxisType.Auto,)
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=auto)
  return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,), axis_types=auto)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, schedules)."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Split along the first (batch) axis over the mesh's devices."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(
    batch: Mapping[str, Any], sharding: NamedSharding, keys: Optional[Iterable[str]] = None
) -> Dict[str, jax.Array]:
  """This process's rows of a batch (numpy) -> global arrays sharded as `sharding`.

  Args:
    batch: the process-local batch, `[b_local, ...]` per key.
    sharding: `batch_sharded(mesh)`.
    keys: the keys to transfer (default all).
  """
  keys = batch.keys() if keys is None else keys
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in keys}
