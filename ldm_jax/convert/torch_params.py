"""Shared core of the reference-weight converters: our parameter tree from a torch state dict.

A converter only says where each of our modules lives in the reference: a `rename` function
maps one of our module paths (a tuple such as ('down0_res0', 'emb_proj')) to a state-dict
prefix ('down_blocks.0.resnets.0.time_emb_proj'), or to a `Fused` of three prefixes for our
fused q/k/v projection. `params_from_state_dict` walks the abstract parameter tree of the
module we build (so every parameter we need is asked for, with its shape), converts the
layouts (torch OIHW conv -> HWIO, (out, in) linear -> (in, out), 1x1 convs used as linear
layers are squeezed) and raises one `UserError` that lists every missing, unused and
wrongly shaped key. Pure numpy; no torch needed.
"""
import dataclasses
from typing import Any, Callable, Dict, Mapping, Tuple, Union

import jax
import numpy as np

from ldm_jax.errors import UserError

# Our leaf name -> the torch parameter name.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_LIST_LIMIT = 20


@dataclasses.dataclass(frozen=True)
class Fused:
  """Our q/k/v Dense(3C) from three torch linears (or 1x1 convs), in q, k, v order.

  With `heads` > 0 the source is ONE prefix whose rows are LDM's legacy per-head layout
  ([head][q|k|v][head_dim], `QKVAttentionLegacy`); it is re-ordered to q | k | v.
  """
  prefixes: Tuple[str, ...]
  heads: int = 0

  def __str__(self):
    return "+".join(self.prefixes) + (f" (legacy, {self.heads} heads)" if self.heads else "")


Source = Union[str, Fused]


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> Dict[str, Any]:
  """The entries under `prefix` (without it); the whole dict when no key has the prefix."""
  if any(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return dict(state_dict)


def _linear(w: np.ndarray, key: str) -> np.ndarray:
  """(out, in), (out, in, 1) or (out, in, 1, 1) -> (out, in)."""
  if w.ndim < 2 or any(d != 1 for d in w.shape[2:]):
    raise UserError(f"{key}: shape {w.shape} is not a linear layer or 1x1 convolution")
  return w.reshape(w.shape[:2])


def _unlegacy(w: np.ndarray, heads: int) -> np.ndarray:
  """Rows [head][q|k|v][d] -> [q|k|v][head][d] (works on weights and on biases)."""
  rest = w.shape[1:]
  return w.reshape((heads, 3, -1) + rest).swapaxes(0, 1).reshape((-1,) + rest)


def _leaf(source: Source, leaf: str, ndim: int, take: Callable[[str], Any]):
  """One of our leaves from its source(s); None when a source key is missing."""
  if isinstance(source, Fused):
    keys = [f"{p}.{_TORCH_LEAF[leaf]}" for p in source.prefixes]
    parts = [take(k) for k in keys]
    if any(p is None for p in parts):
      return None
    if leaf == "kernel":
      parts = [_linear(p, k) for p, k in zip(parts, keys)]
    value = np.concatenate(parts, axis=0)
    if source.heads:
      value = _unlegacy(value, source.heads)
    return value.T if leaf == "kernel" else value
  key = f"{source}.{_TORCH_LEAF[leaf]}"
  value = take(key)
  if value is None or leaf != "kernel":
    return value
  if ndim == 4:  # conv: OIHW -> HWIO
    if value.ndim != 4:
      raise UserError(f"{key}: shape {value.shape} is not a 2-d convolution kernel")
    return value.transpose(2, 3, 1, 0)
  return _linear(value, key).T


def _listing(what: str, keys) -> str:
  keys = sorted(keys)
  more = f" ... (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
  return f"{what} ({len(keys)}): {', '.join(keys[:_LIST_LIMIT])}{more}"


def params_from_state_dict(abstract: Any, state_dict: Mapping[str, Any],
                           rename: Callable[[Tuple[str, ...]], Source], what: str) -> Any:
  """Our parameter tree (float32 numpy) shaped like `abstract` from a torch state dict.

  Args:
    abstract: our parameter tree of ShapeDtypeStructs (`jax.eval_shape` of `init`)["params"].
    state_dict: reference key -> array (numpy, or anything `np.asarray` takes).
    rename: our module path -> the reference prefix (or `Fused`).
    what: names the model in error messages (e.g. "diffusers UNet2DConditionModel").

  Raises:
    UserError: listing the reference keys that are missing, left unused, or wrongly shaped.
  """
  used, missing, bad_shape = set(), set(), []

  def take(key):
    if key not in state_dict:
      missing.add(key)
      return None
    used.add(key)
    return np.asarray(state_dict[key], np.float32)

  def convert(path, spec):
    names = tuple(str(p.key) for p in path)
    source = rename(names[:-1])
    value = _leaf(source, names[-1], len(spec.shape), take)
    if value is not None and value.shape != tuple(spec.shape):
      bad_shape.append(f"{source}.{_TORCH_LEAF[names[-1]]} {value.shape} != "
                       f"{tuple(spec.shape)} of our {'/'.join(names)}")
    return value

  params = jax.tree_util.tree_map_with_path(convert, abstract)
  unused = set(state_dict) - used
  problems = []
  if missing:
    problems.append(_listing("missing keys", missing))
  if unused:
    problems.append(_listing("unknown keys", unused))
  if bad_shape:
    problems.append(_listing("shape mismatches", bad_shape))
  if problems:
    raise UserError(f"{what} state dict does not match the configured model: "
                    + "; ".join(problems))
  return params
