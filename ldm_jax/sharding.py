"""Device mesh, partition rules and data placement: the only module that speaks of devices.

Mesh axes are ('data', 'fsdp', 'tensor'). The batch is split over data x fsdp. Parameters and
optimizer state follow regex rules (big_vision style) on their '/'-joined path; the default
rule shards each large array's biggest dimension divisible by the fsdp size (ZeRO-3 style) and
replicates the rest.
"""
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] = None) -> Mesh:
  """Builds the mesh from `config.mesh` {data, fsdp, tensor}; one axis may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise UserError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise UserError(f"config.mesh {dict(zip(AXES, sizes))} does not fit {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if any(s < 1 for s in sizes) or int(np.prod(sizes)) != len(devices):
    raise UserError(f"config.mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                    f"this run has {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_size_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "train.batch_size") -> None:
  div = batch_size_divisor(mesh)
  if batch_size % div or batch_size % jax.process_count():
    raise UserError(f"config.{key}={batch_size} is not divisible by the batch axes of the mesh "
                    f"(data x fsdp = {div}) and the process count ({jax.process_count()})")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = 2 ** 14) -> P:
  """Shards the largest dimension divisible by `fsdp`; small arrays stay replicated."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (),
                    fsdp_min_size: int = 2 ** 14) -> Any:
  """A NamedSharding for every leaf of an abstract (eval_shape) state.

  `rules` are (regex, PartitionSpec tuple) pairs matched against the leaf path in order; the
  first match wins, and leaves with no match get `fsdp_spec`.
  """
  compiled = [(re.compile(r), P(*spec)) for r, spec in rules]

  def leaf_sharding(path, leaf):
    name = _path_name(path)
    for regex, spec in compiled:
      if regex.search(name):
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, fsdp_spec(getattr(leaf, "shape", ()), mesh.shape["fsdp"],
                                         fsdp_min_size))

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def put_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch -> global jax.Array split over the batch axes of the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
