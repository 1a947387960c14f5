"""Device mesh, partition rules and data placement: the only module that speaks of devices.

Mesh axes are ('data', 'fsdp', 'tensor'). The batch is split over data x fsdp. Parameters and
optimizer state follow regex rules (big_vision style) on their '/'-joined path: first the
rules of `config.mesh.rules`, then `DEFAULT_RULES` (Megatron-style tensor parallelism for
attention and MLP kernels, FSDP on the other dimension), and for every other leaf the FSDP
default: each large array's biggest dimension divisible by the fsdp size (ZeRO-3 style). Rules
match path suffixes, so Adam's mu/nu and the EMA copy of a parameter get the parameter's
sharding. A rule's axis that does not divide its dimension is dropped for that array.

Devices are laid out process-major (jax.devices() order) with 'data' outermost: on a pod the
data axis spans hosts and slices, fsdp and tensor stay within a host where the links are fast,
and each process's rows of the global batch are one contiguous block (see `check_local_rows`).
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


# (regex on the '/'-joined leaf path, spec per dimension). Column-parallel layers (q/k/v and
# the first MLP layer) split their output features over 'tensor', row-parallel ones (the
# attention output and the second MLP layer) their input features, so that the activation
# between them stays split by heads / hidden units and needs one reduction per block.
DEFAULT_RULES = (
    (r"(to_q|to_k|to_v|qkv|ff/proj_in|mlp_in)/kernel$", ("fsdp", "tensor")),
    (r"(qkv|ff/proj_in|mlp_in)/bias$", ("tensor",)),
    (r"(to_out|attn[^/]*/proj_out|ff/proj_out|mlp_out)/kernel$", ("tensor", "fsdp")),
)


def partition_rules(mesh_cfg) -> tuple[tuple, int]:
  """(rules, fsdp_min_size) from `config.mesh`: its `rules` first, then DEFAULT_RULES."""
  user = tuple(mesh_cfg.get("rules", ()) or ()) if mesh_cfg is not None else ()
  for i, rule in enumerate(user):
    if len(rule) != 2:
      raise UserError(f"config.mesh.rules[{i}]={rule!r} is not a (regex, spec) pair")
    regex, spec = rule
    try:
      re.compile(regex)
    except re.error as e:
      raise UserError(f"config.mesh.rules[{i}]: bad regex {regex!r} ({e})") from e
    for axis in jax.tree.leaves(tuple(spec)):
      if axis not in AXES:
        raise UserError(f"config.mesh.rules[{i}]: axis {axis!r} is not one of {list(AXES)}")
  min_size = int(mesh_cfg.get("fsdp_min_size", 2 ** 14)) if mesh_cfg is not None else 2 ** 14
  return user + DEFAULT_RULES, min_size


def fit_spec(spec: Sequence[Any], shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` (padded with None to the rank) minus the axes that do not divide their dimension."""
  spec = tuple(spec)[:len(shape)] + (None,) * max(0, len(shape) - len(spec))
  out = []
  for dim, entry in zip(shape, spec):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, size = [], 1
    for axis in axes:
      n = mesh.shape[axis]
      if n > 1 and dim % (size * n) == 0:
        kept.append(axis)
        size *= n
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


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


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    fsdp_min_size: int = 2 ** 14) -> Any:
  """A NamedSharding for every leaf of an abstract (eval_shape) state.

  `rules` are (regex, spec tuple) pairs matched against the leaf path in order; the first
  match wins (fitted to the leaf by `fit_spec`), and leaves with no match get `fsdp_spec`.
  """
  compiled = [(re.compile(r), tuple(spec)) for r, spec in rules]

  def leaf_sharding(path, leaf):
    name = _path_name(path)
    shape = getattr(leaf, "shape", ())
    for regex, spec in compiled:
      if regex.search(name):
        return NamedSharding(mesh, fit_spec(spec, shape, mesh))
    return NamedSharding(mesh, fsdp_spec(shape, mesh.shape["fsdp"], fsdp_min_size))

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def check_local_rows(mesh: Mesh, global_batch: int) -> None:
  """This process's devices must hold rows [p * B, (p + 1) * B) of the global batch, the rows
  the data pipeline gives process p (B = global_batch / process_count)."""
  local = global_batch // jax.process_count()
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = set()
  for index in index_map.values():
    rows.update(range(*index[0].indices(global_batch)))
  start = jax.process_index() * local
  if rows != set(range(start, start + local)):
    raise UserError(f"config.mesh {dict(mesh.shape)}: the devices of process "
                    f"{jax.process_index()} do not hold one contiguous block of the batch; "
                    "keep 'data' x 'fsdp' a multiple of the process count")


def put_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch -> global jax.Array split over the batch axes of the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` fully replicated on the mesh. Unlike `jax.device_put`, this also works with several
  processes, for host values (the same on every process) and for global arrays alike."""
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
