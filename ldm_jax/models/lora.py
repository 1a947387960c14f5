"""LoRA (Hu et al. 2021) as a transformation of a parameter tree, so no module changes: the
adapted kernel of a Dense layer is W + s * down @ up, down [in, r] and up [r, out], with
s = lora_scale * alpha / rank. The adapters are a tree shaped like the parameters down to each
adapted kernel, which holds {"down", "up"} instead of the kernel (`flat` views it as
{"unet/down0_attn0/block0/attn1/to_q/kernel": {"down", "up"}}); `merge` applies them (inside
the jitted train step, where gradients reach only the adapters, or once to sample).

Default targets are the attention projections diffusers' LoRA scripts and peft adapt in the
UNet (`to_q`, `to_k`, `to_v`, `to_out.0`). Initialisation as the paper: down Gaussian
(std 1 / rank), up zero, so a fresh adapter leaves the model unchanged.
"""
import re
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.errors import UserError

DEFAULT_TARGETS = r"^unet/.*/(to_q|to_k|to_v|to_out)/kernel$"


def leaf_path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def target_paths(params: Any, targets: str = DEFAULT_TARGETS) -> dict[str, tuple]:
  """{path: kernel shape} of the 2-D kernels whose path matches the regex `targets`."""
  try:
    pattern = re.compile(targets)
  except re.error as e:
    raise UserError(f"lora.targets={targets!r} is not a regular expression: {e}") from e
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = leaf_path(path)
    if pattern.search(name) and len(leaf.shape) == 2:
      found[name] = tuple(leaf.shape)
  if not found:
    raise UserError(f"lora.targets={targets!r} matches no 2-D kernel of the model")
  return found


def nest(flat_adapters: dict) -> dict:
  """{"a/b/kernel": {"down", "up"}} -> {"a": {"b": {"kernel": {"down", "up"}}}}."""
  out: dict = {}
  for name, a in flat_adapters.items():
    node = out
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = dict(a)
  return out


def flat(adapters: dict) -> dict:
  """The inverse of `nest`."""
  out = {}

  def walk(node, prefix):
    if set(node) == {"down", "up"} and not isinstance(node["down"], dict):
      out["/".join(prefix)] = node
      return
    for k, v in node.items():
      walk(v, prefix + [str(k)])
  walk(adapters, [])
  return out


def init(params: Any, rank: int, rng: jax.Array, targets: str = DEFAULT_TARGETS) -> dict:
  """Fresh adapters of `rank` for the targeted kernels of `params` (arrays or shapes)."""
  if rank < 1:
    raise UserError(f"lora.rank={rank} must be at least 1")
  out = {}
  shapes = target_paths(params, targets)
  for key, (name, (fan_in, fan_out)) in zip(jax.random.split(rng, len(shapes)),
                                            sorted(shapes.items())):
    out[name] = {"down": jax.random.normal(key, (fan_in, rank), jnp.float32) / rank,
                 "up": jnp.zeros((rank, fan_out), jnp.float32)}
  return nest(out)


def merge(params: Any, adapters: dict, scale) -> Any:
  """`params` with W + scale * down @ up at every adapted kernel (one line naming an adapter
  whose kernel the model lacks or has another shape)."""
  adapters = flat(adapters)
  flat_params = {leaf_path(p): leaf
                 for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, a in adapters.items():
    if name not in flat_params:
      raise UserError(f"LoRA adapter {name!r}: the model has no such kernel")
    want = (a["down"].shape[0], a["up"].shape[1])
    if tuple(flat_params[name].shape) != want:
      raise UserError(f"LoRA adapter {name!r} is for a {want} kernel, the model's is "
                      f"{tuple(flat_params[name].shape)}")

  def add(path, leaf):
    a = adapters.get(leaf_path(path))
    if a is None:
      return leaf
    delta = jnp.asarray(a["down"], jnp.float32) @ jnp.asarray(a["up"], jnp.float32)
    return (leaf + jnp.asarray(scale, jnp.float32) * delta).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(add, params)


def rank_of(adapters: dict) -> int:
  ranks = {int(a["down"].shape[1]) for a in flat(adapters).values()}
  if len(ranks) != 1:
    raise UserError(f"LoRA adapters of mixed ranks {sorted(ranks)} are not supported")
  return ranks.pop()
