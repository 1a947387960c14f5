"""diffusers-format LoRA files <-> our adapters (`ldm_jax.models.lora`).

diffusers' `save_lora_weights` / `load_lora_weights` (peft layout) store, per adapted UNet
linear with diffusers name P, `unet.P.lora_A.weight` [rank, in] and `unet.P.lora_B.weight`
[out, rank]; the adapter adds (alpha / rank) B A, alpha taken from the file's
`lora_adapter_metadata` (`unet.lora_alpha`) or, without it, equal to the rank. Our adapter
(down [in, rank], up [rank, out]) is A^T and (alpha / rank) B^T. The older diffusers layout
(`unet.P.lora.down.weight` / `lora.up.weight`) reads too. Names are mapped with the UNet
converter's own `diffusers_rename`, so every kernel the converter reads can be adapted.
Text-encoder adapters and other layouts (kohya's `lora_unet_...`) are refused with one line.
"""
import json
import os
from typing import Any

import numpy as np

from ldm_jax.convert import diffusers_models as dm
from ldm_jax.errors import UserError
from ldm_jax.models import lora as lora_lib

FILE_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",
             "lora.up.weight": "up"}


def _prefixes(params: Any, n_levels: int) -> dict[str, str]:
  """{diffusers module prefix: our kernel path} for every 2-D UNet kernel."""
  unet = params["unet"]
  self_attn = dm.self_attention_paths(unet)
  out = {}
  for name in lora_lib.target_paths(params, r"^unet/.*/kernel$"):
    module = tuple(name.split("/")[1:-1])
    source = dm.diffusers_rename(module, n_levels, self_attn)
    if isinstance(source, str):
      out[source] = name
  return out


def read(path: str) -> tuple[dict, dict]:
  """(state dict as numpy, safetensors metadata) of a LoRA file (or a folder holding
  FILE_NAME)."""
  if os.path.isdir(path):
    path = os.path.join(path, FILE_NAME)
  if not os.path.isfile(path):
    raise UserError(f"--lora={path}: no such file")
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def from_diffusers(state_dict: dict, metadata: dict, params: Any, n_levels: int,
                   what: str = "LoRA file") -> dict:
  """Our adapters (scale alpha / rank folded into `up`; `lora.nest`ed) from a diffusers LoRA
  state dict."""
  prefixes = _prefixes(params, n_levels)
  alpha = None
  if metadata.get("lora_adapter_metadata"):
    meta = json.loads(metadata["lora_adapter_metadata"])
    if meta.get("unet.rank_pattern") or meta.get("unet.alpha_pattern"):
      raise UserError(f"{what}: per-module rank_pattern / alpha_pattern is not supported")
    alpha = meta.get("unet.lora_alpha")
  parts: dict[str, dict] = {}
  for key, value in state_dict.items():
    if not key.startswith("unet."):
      raise UserError(f"{what}: {key!r} is not a UNet adapter in diffusers' layout "
                      "(text-encoder LoRA and kohya files are not supported)")
    body = key[len("unet."):]
    suffix = next((s for s in _SUFFIXES if body.endswith("." + s)), None)
    if suffix is None:
      raise UserError(f"{what}: {key!r} is neither lora_A/lora_B nor lora.down/lora.up")
    prefix = body[:-len(suffix) - 1]
    if prefix not in prefixes:
      raise UserError(f"{what}: {key!r} adapts {prefix!r}, which this model does not have")
    parts.setdefault(prefixes[prefix], {})[_SUFFIXES[suffix]] = np.asarray(value, np.float32)
  if not parts:
    raise UserError(f"{what} holds no adapters")
  out = {}
  for name, p in parts.items():
    if set(p) != {"down", "up"}:
      raise UserError(f"{what}: the adapter of {name} lacks its {({'down', 'up'} - set(p)).pop()} "
                      "matrix")
    rank = p["down"].shape[0]
    scale = 1.0 if alpha is None else float(alpha) / rank
    out[name] = {"down": p["down"].T.copy(), "up": (scale * p["up"]).T.copy()}
  return lora_lib.nest(out)


def to_diffusers(adapters: dict, params: Any, n_levels: int, scale: float) -> dict:
  """diffusers' peft-layout state dict of our adapters, `scale` (alpha / rank) folded into
  lora_B so the file means what it means with alpha = rank (no metadata needed)."""
  names = {v: k for k, v in _prefixes(params, n_levels).items()}
  out = {}
  for name, a in lora_lib.flat(adapters).items():
    if name not in names:
      raise UserError(f"LoRA adapter {name!r} has no diffusers name")
    p = f"unet.{names[name]}"
    out[p + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(a["down"], np.float32).T)
    out[p + ".lora_B.weight"] = np.ascontiguousarray(scale * np.asarray(a["up"],
                                                                         np.float32).T)
  return out


def write(path: str, state_dict: dict) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  save_file(state_dict, path)


def apply_file(pipe, path: str, scale: float = 1.0) -> dict:
  """Adds the adapters of a diffusers LoRA file to a loaded pipeline's parameters, times
  `scale` (diffusers' `cross_attention_kwargs={"scale": ...}` / `--lora_scale`). Returns the
  adapters (nested)."""
  if getattr(pipe, "stages", None) is not None:
    raise UserError("--lora adapts one stage: give a single-stage (LDM or pixel) workdir")
  state, metadata = read(path)
  adapters = from_diffusers(state, metadata, pipe.params, len(pipe.model.unet.channel_mult),
                            f"LoRA file {path}")
  pipe.params = lora_lib.merge(pipe.params, adapters, scale)
  return adapters
