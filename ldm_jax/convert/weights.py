"""Reading reference weight files safely: name -> float32 numpy array, no code execution.

  *.safetensors         safetensors.numpy.load_file
  *.bin, *.ckpt, *.pt,  torch.load(weights_only=True) (pickle restricted to tensors and plain
  *.pth                 containers); a top-level 'state_dict' (Lightning / CompVis) is unwrapped

A diffusers component folder holds `config.json` and one weights file
(`diffusion_pytorch_model.safetensors`, `model.safetensors`, or the `.bin` variants; sharded
files with an `*.index.json` are merged).
"""
import json
import os
from typing import Any, Dict

import numpy as np

from ldm_jax.errors import UserError

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin")


def _to_numpy(value: Any, key: str) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor (bf16/fp16 go through float32)
    value = value.detach().cpu()
    if not value.is_floating_point():
      return value.numpy()
    return value.float().numpy()
  arr = np.asarray(value) if isinstance(value, (np.ndarray, np.generic)) else None
  if arr is None or arr.dtype == object:
    raise UserError(f"weight {key!r} is not an array ({type(value).__name__})")
  return arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else arr


def load_file(path: str) -> Dict[str, np.ndarray]:
  """A state dict (name -> numpy array, floats as float32) from one weights file."""
  if not os.path.isfile(path):
    raise UserError(f"weights file {path!r} does not exist")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file as st_load  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError("reading .safetensors needs the `safetensors` package "
                      "(pip install -e .[sd])") from e
    return {k: _to_numpy(v, k) for k, v in st_load(path).items()}
  if path.endswith((".bin", ".ckpt", ".pt", ".pth")):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise UserError(f"reading {os.path.basename(path)} needs torch (pip install torch)") from e
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refuses non-tensor objects with weights_only=True
      raise UserError(f"cannot read {path!r} as plain tensors (torch.load weights_only=True): "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
      obj = obj["state_dict"]
    if not isinstance(obj, dict):
      raise UserError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    return {k: _to_numpy(v, k) for k, v in obj.items()}
  raise UserError(f"unknown weights format {path!r}: expected .safetensors, .bin, .ckpt, .pt "
                  "or .pth")


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise UserError(f"{path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"{path!r} is not valid JSON: {e}") from e


def load_component(folder: str) -> tuple[dict, Dict[str, np.ndarray]]:
  """(config.json dict, state dict) of a diffusers / transformers component folder."""
  config = read_json(os.path.join(folder, "config.json"))
  for name in _WEIGHT_NAMES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return config, load_file(path)
  indexes = sorted(n for n in os.listdir(folder) if n.endswith(".index.json"))
  if indexes:
    index = read_json(os.path.join(folder, indexes[0]))
    state: Dict[str, np.ndarray] = {}
    for shard in sorted(set(index.get("weight_map", {}).values())):
      state.update(load_file(os.path.join(folder, shard)))
    return config, state
  raise UserError(f"no weights in {folder!r}: looked for {', '.join(_WEIGHT_NAMES)} or a "
                  "sharded *.index.json")
