"""What evaluation computes once and reuses: the judge classifier of a data set and the
reference features of its test split, as `.npz` files under a cache folder
(`--cache_dir`, else $LDM_JAX_CACHE, else ~/.cache/ldm_jax). Each file name carries a hash of
everything that determines its content (data source, image size, split, seed, epochs, limits,
the feature network's weights), so a changed setting never reads a stale file."""
import hashlib
import json
import os
from typing import Any, Callable, Mapping, Optional

import numpy as np
from flax import traverse_util

from ldm_jax import files
from ldm_jax.errors import UserError


def default_dir() -> str:
  return os.environ.get("LDM_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "ldm_jax")


def data_identity(data_cfg) -> dict:
  """The data config keys that decide which images a split holds."""
  keys = ("source", "name", "folder", "local_dir", "image_key", "label_key", "image_size",
          "channels", "train_split", "eval_split")
  return {k: data_cfg.get(k, None) for k in keys}


def key(**parts: Any) -> str:
  """A short hash of JSON-able parts."""
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def file_digest(path: str) -> str:
  """sha1 of a file's bytes (the identity of a weights file)."""
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()[:16]


def _flatten(tree: Mapping[str, Any]) -> dict:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def _write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.replaced(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


def _read_npz(path: str) -> dict:
  try:
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError) as e:
    raise UserError(f"cache file {path} is damaged ({e}): delete it") from e


def cached_tree(path: str, compute: Callable[[], Mapping[str, Any]]) -> tuple[dict, bool]:
  """(tree, reused): the nested dict of arrays stored at `path`, or `compute()` stored there."""
  if os.path.exists(path):
    return _unflatten(_read_npz(path)), True
  tree = compute()
  _write_npz(path, _flatten(tree))
  return _unflatten(_flatten(tree)), False


def cached_array(path: str, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
  """(array, reused) stored at `path` (key 'array')."""
  tree, reused = cached_tree(path, lambda: {"array": np.asarray(compute())})
  return tree["array"], reused


def path_in(cache_dir: Optional[str], name: str) -> str:
  return os.path.join(cache_dir or default_dir(), name)
