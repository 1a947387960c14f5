"""Converts PyTorch LPIPS-VGG weights to the `.npz` that `ldm_jax.losses.lpips` reads.

LPIPS-VGG needs two sets of weights: torchvision's ImageNet VGG16 `features` and the `lpips`
package's linear calibration layers (`weights/v0.1/vgg.pth`). On a machine with internet:

  pip install torch torchvision lpips
  python -c "import torch, torchvision; torch.save(torchvision.models.vgg16(
      weights='IMAGENET1K_V1').features.state_dict(), 'vgg16_features.pth')"
  python -c "import lpips, os; print(os.path.join(os.path.dirname(lpips.__file__),
      'weights', 'v0.1', 'vgg.pth'))"        # copy that file, e.g. to lpips_lin_vgg.pth

(the lin file is also at github.com/richzhang/PerceptualSimilarity, lpips/weights/v0.1/vgg.pth).
Then, here (torch only, no torchvision needed):

  python -m ldm_jax.convert.lpips_torch --vgg=vgg16_features.pth \
      --lin=lpips_lin_vgg.pth --out=lpips_vgg.npz

or, from one full `lpips.LPIPS(net='vgg').state_dict()` saved with `torch.save`:

  python -m ldm_jax.convert.lpips_torch --state_dict=lpips_full.pth --out=lpips_vgg.npz

and point the config at the result: `config.loss.lpips_weights = '/path/lpips_vgg.npz'`.

Accepted keys: `--vgg`: torchvision `features` keys `0.weight` ... `28.bias` (a whole
`vgg16().state_dict()`, e.g. torchvision's cached `vgg16-397923af.pth`, also works: its
`features.` prefix is stripped and its `classifier.*` keys are ignored). `--lin`:
`lin{0..4}.model.1.weight`. `--state_dict`: `net.slice{1..5}.{idx}.weight|bias`,
`lin{0..4}.model.1.weight` and optionally `scaling_layer.shift|scale` (checked against the
constants). Any other key, or any missing one, is an error that lists them.
Torch files are read with `torch.load(path, map_location='cpu', weights_only=True)`.
"""
import argparse
import os
import sys
from typing import Dict, Mapping

import numpy as np

from ldm_jax.errors import UserError
from ldm_jax.losses import lpips as lpips_lib


def vgg_torch_indices() -> Dict[str, int]:
  """Flax conv name -> index in torchvision's `vgg16().features` (conv1_1 -> 0 ... 5_3 -> 28)."""
  out, idx = {}, 0
  for b, names in enumerate(lpips_lib.vgg_conv_names()):
    if b > 0:
      idx += 1  # the max-pool opening each later block
    for name in names:
      out[name] = idx
      idx += 2  # conv, relu
  return out


def torch_key_map() -> Dict[str, str]:
  """Full `lpips.LPIPS(net='vgg')` state_dict key -> '/'-joined Flax param key."""
  indices = vgg_torch_indices()
  keys, names = {}, lpips_lib.vgg_conv_names()
  for s, block in enumerate(names, 1):
    for name in block:
      keys[f"net.slice{s}.{indices[name]}.weight"] = f"vgg/{name}/kernel"
      keys[f"net.slice{s}.{indices[name]}.bias"] = f"vgg/{name}/bias"
  for k in range(len(lpips_lib.TAP_CHANNELS)):
    keys[f"lin{k}.model.1.weight"] = f"lin{k}/kernel"
  return keys


_SCALING = {"scaling_layer.shift": lpips_lib.SHIFT, "scaling_layer.scale": lpips_lib.SCALE}


def convert_state_dict(sd: Mapping[str, np.ndarray]):
  """Full `lpips.LPIPS(net='vgg')` state_dict (numpy arrays) -> Flax LPIPS params (nested dict).

  Conv kernels go from torch OIHW to Flax HWIO. Raises UserError listing unknown or missing
  keys, wrong shapes, or scaling-layer constants other than LPIPS v0.1's.
  """
  key_map = torch_key_map()
  missing = sorted(set(key_map) - set(sd))
  unknown = sorted(set(sd) - set(key_map) - set(_SCALING))
  if missing or unknown:
    raise UserError(f"LPIPS state_dict: missing keys {missing}, unknown keys {unknown}")
  for key, want in _SCALING.items():
    if key in sd and not np.allclose(np.asarray(sd[key], np.float64).reshape(-1), want,
                                     rtol=0, atol=1e-6):
      raise UserError(f"LPIPS state_dict: {key} = {np.asarray(sd[key]).reshape(-1).tolist()}, "
                      f"expected v0.1's {list(want)}")
  flat = {}
  for torch_key, flax_key in key_map.items():
    a = np.asarray(sd[torch_key], np.float32)
    flat[flax_key] = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a
  lpips_lib.check_flat_params(flat, "state_dict")
  return lpips_lib.unflatten_params(flat)


def merge_vgg_and_lin(vgg_sd: Mapping[str, np.ndarray], lin_sd: Mapping[str, np.ndarray]
                      ) -> Dict[str, np.ndarray]:
  """torchvision VGG16 (features) state_dict + lpips `vgg.pth` -> full LPIPS state_dict keys."""
  vgg = {}
  for key, value in vgg_sd.items():
    if key.startswith("classifier."):
      continue  # a whole vgg16().state_dict(): the classifier is not used
    vgg[key[len("features."):] if key.startswith("features.") else key] = value
  to_slice = {}
  for s, block in enumerate(lpips_lib.vgg_conv_names(), 1):
    for name in block:
      to_slice[vgg_torch_indices()[name]] = s
  full, unknown = {}, []
  for key, value in vgg.items():
    idx, _, leaf = key.partition(".")
    if idx.isdigit() and int(idx) in to_slice and leaf in ("weight", "bias"):
      full[f"net.slice{to_slice[int(idx)]}.{key}"] = value
    else:
      unknown.append(key)
  if unknown:
    raise UserError(f"VGG16 state_dict: unknown keys {sorted(unknown)} (want torchvision "
                    f"vgg16 features keys 0.weight ... 28.bias)")
  lin_keys = [k for k in torch_key_map() if k.startswith("lin")]
  unknown = sorted(set(lin_sd) - set(lin_keys))
  if unknown:
    raise UserError(f"LPIPS lin state_dict: unknown keys {unknown} (want {lin_keys})")
  full.update(lin_sd)
  return full


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a `torch.save`d state_dict safely (weights_only) as {key: float32 numpy array}."""
  if not os.path.isfile(path):
    raise UserError(f"PyTorch weights file not found: {path!r}")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError("reading PyTorch weights needs torch (pip install 'ldm_jax[parity]'), "
                    f"for {path!r}") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many kinds)
    raise UserError(f"cannot read {path!r} as a PyTorch state_dict: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  if not isinstance(sd, Mapping):
    raise UserError(f"{path!r} holds a {type(sd).__name__}, not a state_dict")
  bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise UserError(f"{path!r}: entries that are not tensors: {bad}")
  return {k: v.detach().to(torch.float32).numpy() for k, v in sd.items()}


def save_npz(params, out: str) -> None:
  """Writes params as the '/'-keyed float32 `.npz` that `load_lpips_params` reads."""
  flat = {k: np.asarray(v, np.float32) for k, v in lpips_lib.flatten_params(params).items()}
  lpips_lib.check_flat_params(flat, "to save")
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = out + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ldm_jax.convert.lpips_torch",
      description="PyTorch LPIPS-VGG v0.1 weights -> lpips_vgg.npz for ldm_jax.")
  parser.add_argument("--vgg", help="torchvision vgg16 features state_dict (.pth)")
  parser.add_argument("--lin", help="lpips package weights/v0.1/vgg.pth")
  parser.add_argument("--state_dict", help="one full lpips.LPIPS(net='vgg').state_dict() .pth")
  parser.add_argument("--out", required=True, help="output .npz (config.loss.lpips_weights)")
  args = parser.parse_args(argv)
  try:
    if args.state_dict and (args.vgg or args.lin):
      raise UserError("give either --state_dict or --vgg and --lin, not both")
    if args.state_dict:
      sd = load_torch_state_dict(args.state_dict)
    elif args.vgg and args.lin:
      sd = merge_vgg_and_lin(load_torch_state_dict(args.vgg), load_torch_state_dict(args.lin))
    else:
      raise UserError("give --state_dict, or both --vgg and --lin")
    save_npz(convert_state_dict(sd), args.out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
