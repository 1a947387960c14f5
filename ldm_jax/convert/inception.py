"""Converts the FID Inception-v3 weights to the `.npz` that `python -m ldm_jax.evaluate` reads.

FID and KID are defined on TensorFlow's 2015-12-05 Inception graph; pytorch-fid publishes it
as a PyTorch state dict, `pt_inception-2015-12-05-6726825d.pth` (95 MB): the file
`pytorch_fid.inception.FID_WEIGHTS_URL` names, in the release assets of the
mseitzer/pytorch-fid GitHub repository (`fid_weights` release). Nothing here downloads it. On a
machine with internet, fetch that file (or run `pip install pytorch-fid` and any pytorch-fid
command once: torch caches it under ~/.cache/torch/hub/checkpoints/), then here:

  python -m ldm_jax.convert.inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz
  python -m ldm_jax.evaluate --workdir=runs/ldm --inception=inception_fid.npz

(`--inception` also takes the .pth itself, converted on every run; that needs torch.)

Accepted keys: torchvision's `Inception3` names (`Conv2d_1a_3x3.conv.weight`,
`Mixed_7c.branch_pool.bn.running_var`, ...): conv weights and batch-norm weight, bias and
running statistics of every layer up to `Mixed_7c`. The classifier heads (`fc.*`,
`AuxLogits.*`) and `num_batches_tracked` are not used by the pool3 features and are skipped;
any other key, a missing one, or a wrong shape is an error that lists them. With
`--torchvision`, the state dict is read as torchvision's `inception_v3` architecture (its
average pools count padded zeros; not the network FID is defined on).
"""
import argparse
import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from ldm_jax.convert import torch_params
from ldm_jax.convert.weights import load_file
from ldm_jax.errors import UserError
from ldm_jax.models import inception

WHAT = "Inception-v3 (pytorch-fid / torchvision names)"
SKIPPED_PREFIXES = ("fc.", "AuxLogits.")
_STATS = {"mean": "running_mean", "var": "running_var"}


def _stats_from_state_dict(abstract: Any, sd: Mapping[str, np.ndarray]) -> Any:
  """batch_stats (mean / var) from the running statistics; raises listing every problem."""
  missing, bad = [], []

  def convert(path, spec):
    names = [str(p.key) for p in path]
    key = ".".join(names[:-1] + [_STATS[names[-1]]])
    if key not in sd:
      missing.append(key)
      return None
    value = np.asarray(sd[key], np.float32)
    if value.shape != tuple(spec.shape):
      bad.append(f"{key} {value.shape} != {tuple(spec.shape)}")
    return value

  stats = jax.tree_util.tree_map_with_path(convert, abstract)
  if missing or bad:
    raise UserError(f"{WHAT} state dict does not match: missing running statistics "
                    f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, shape mismatches "
                    f"{bad[:10]}")
  return stats


def convert_state_dict(sd: Mapping[str, Any], fid_variant: bool = True) -> Dict[str, Any]:
  """A pytorch-fid / torchvision Inception-v3 state dict -> {'params', 'batch_stats'} of
  `ldm_jax.models.inception.InceptionV3(fid_variant)` (float32 numpy)."""
  sd = {k: np.asarray(v) for k, v in sd.items()
        if not k.startswith(SKIPPED_PREFIXES) and not k.endswith(".num_batches_tracked")}
  abstract = inception.abstract_variables(fid_variant)
  running = {k: v for k, v in sd.items() if k.endswith((".running_mean", ".running_var"))}
  weights = {k: v for k, v in sd.items() if k not in running}
  params = torch_params.params_from_state_dict(abstract["params"], weights, ".".join, WHAT)
  return {"params": params,
          "batch_stats": _stats_from_state_dict(abstract["batch_stats"], running)}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def save_npz(path: str, variables: Mapping[str, Any], fid_variant: bool = True) -> None:
  flat = {k: np.asarray(v, np.float32) for k, v in _flatten(variables).items()}
  flat["fid_variant"] = np.asarray(fid_variant)
  with open(path, "wb") as f:
    np.savez(f, **flat)


def _from_npz(path: str) -> tuple[Dict[str, Any], bool]:
  with np.load(path) as z:
    flat = {k: z[k] for k in z.files}
  fid_variant = bool(flat.pop("fid_variant", True))
  abstract = inception.abstract_variables(fid_variant)
  want = {k: tuple(s.shape) for k, s in _flatten(abstract).items()}
  missing = sorted(set(want) - set(flat))
  unknown = sorted(set(flat) - set(want))
  bad = sorted(k for k in set(want) & set(flat) if flat[k].shape != want[k])
  if missing or unknown or bad:
    raise UserError(f"{path} is not a converted Inception-v3 (python -m "
                    f"ldm_jax.convert.inception): missing {missing[:5]}, unknown "
                    f"{unknown[:5]}, wrong shapes {bad[:5]}")
  variables: Dict[str, Any] = {}
  for k, v in flat.items():
    node = variables
    *parents, leaf = k.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v.astype(np.float32)
  return variables, fid_variant


def load_variables(path: str) -> tuple[Dict[str, Any], bool]:
  """(variables, fid_variant) from a converted `.npz` or a torch state dict (.pth, .pt,
  .bin, .safetensors; read as the FID variant)."""
  if path.endswith(".npz"):
    if not os.path.isfile(path):
      raise UserError(f"Inception weights {path!r} do not exist")
    return _from_npz(path)
  return convert_state_dict(load_file(path), True), True


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ldm_jax.convert.inception",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("weights", help="pt_inception-2015-12-05-6726825d.pth (or any "
                      "Inception-v3 state dict with torchvision's names)")
  parser.add_argument("out", help="the .npz to write")
  parser.add_argument("--torchvision", action="store_true",
                      help="read the weights as torchvision's architecture, not FID's")
  args = parser.parse_args(argv)
  try:
    if not args.out.endswith(".npz"):
      raise UserError(f"out={args.out!r} must end in .npz")
    fid_variant = not args.torchvision
    variables = convert_state_dict(load_file(args.weights), fid_variant)
    save_npz(args.out, variables, fid_variant)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
