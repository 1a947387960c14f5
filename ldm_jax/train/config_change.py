"""A workdir keeps its config: what may differ between a workdir's stored config.json and the
config of a train.py that resumes it (pure functions; train/run.py does the I/O).

May change on resume (they do not change what the checkpoints hold or what a step computes):
  <stage>.train: num_steps, log_every, eval_every, checkpoint_every, keep_checkpoints,
                 async_checkpoint, progress_every_secs, profile, nonfinite, sr_eval_images,
                 grad_accum_steps (the same global batch in other microbatches)
  <stage>.optim: lr, warmup_steps, decay (the learning-rate schedule)
  <stage>.sample.*  (sampling settings; training never reads them)
  train.* / optim.* keys of the same names for the autoencoder stage
  mesh.*            (the state is restored onto whatever mesh the job has)
  data.num_threads, prefetch, num_workers (loader performance), download, data_dir
Values resolved during training (a latent stage's estimated `diffusion.latent_scale`: 0 in a
config means "estimate") count as unchanged when the new config leaves them unresolved.
Everything else is refused unless `--allow_config_change` is given.
"""
import fnmatch
from typing import Any, Mapping

import ml_collections

RESUMABLE = (
    "*train.num_steps", "*train.log_every", "*train.eval_every", "*train.checkpoint_every",
    "*train.keep_checkpoints", "*train.async_checkpoint", "*train.progress_every_secs",
    "*train.profile", "*train.nonfinite", "*train.sr_eval_images", "*train.grad_accum_steps",
    "*optim.lr", "*optim.warmup_steps", "*optim.decay",
    "*sample.*", "mesh.*", "data.num_threads", "data.prefetch", "data.num_workers",
    "data.download", "data.data_dir",
)
# key suffix -> the value that means "resolved during training, keep the stored one"
UNRESOLVED = {"diffusion.latent_scale": 0.0}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, (tuple, list)) else value
  return out


def _may_change(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE)


def _unresolved(key: str, new: Any) -> bool:
  return any(key.endswith(suffix) and new == value for suffix, value in UNRESOLVED.items())


def changed_keys(stored: ml_collections.ConfigDict | Mapping,
                 new: ml_collections.ConfigDict | Mapping) -> list[tuple[str, Any, Any]]:
  """(key, stored value, new value) of every key that differs and may not change on resume:
  the changed values first (`stages` before all), then the keys present on one side only
  (`<absent>` on the other), each sorted by key."""
  old_flat = flatten(stored.to_dict() if hasattr(stored, "to_dict") else stored)
  new_flat = flatten(new.to_dict() if hasattr(new, "to_dict") else new)
  out = []
  for key in sorted(set(old_flat) | set(new_flat)):
    old, cur = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
    if old == cur or _may_change(key) or _unresolved(key, cur):
      continue
    out.append((key, old, cur))
  return sorted(out, key=lambda c: (c[0] != "stages", "<absent>" in (c[1], c[2]), c[0]))


def describe(changes: list[tuple[str, Any, Any]], limit: int = 4) -> str:
  shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:limit])
  more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
  return shown + more


def keep_resolved(stored: ml_collections.ConfigDict,
                  new: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`new` with the stored values of keys it leaves unresolved (so a resume of a latent stage
  keeps its estimated latent scale in config.json)."""
  out = ml_collections.ConfigDict(new.to_dict())
  old_flat, new_flat = flatten(stored.to_dict()), flatten(new.to_dict())
  for key, value in new_flat.items():
    if key in old_flat and _unresolved(key, value):
      node = out
      *parents, leaf = key.split(".")
      for part in parents:
        node = node[part]
      node[leaf] = old_flat[key]
  return out
