"""Orbax CheckpointManager wrapper: async, keep-N, atomic saves of a train state plus JSON
metadata (data position, latent scale, ...), restored onto any mesh via target shardings."""
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from ldm_jax.errors import UserError


class Checkpointer:
  """Saves `{'state': pytree, 'meta': json dict}` under `directory/<step>/`."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def all_steps(self):
    return self._manager.all_steps()

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores onto the shardings carried by `abstract_state` (jax.ShapeDtypeStruct leaves)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint found in {self.directory}")
    try:
      out = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise UserError(f"cannot restore checkpoint {self.directory}/{step}: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return out.state, out.meta

  def restore_meta(self, step: Optional[int] = None) -> dict:
    """The JSON metadata of a checkpoint, without reading its arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint found in {self.directory}")
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out.meta

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def restore_eval_params(directory: str, step: Optional[int] = None,
                        ema_key: Optional[str] = None) -> tuple[Any, dict, int]:
  """(parameters to sample with, meta, step) from a checkpoint, onto this process's first
  device, reading only those arrays: the EMA when the state has one, else `params[ema_key]`
  (or all `params`; parameters-only checkpoints of ldm_jax.convert hold just these).

  The tree comes from the checkpoint's own metadata, so no model or optimizer has to be built
  to restore it (the optimizer state is never read).
  """
  directory = os.path.abspath(directory)
  ckpt = Checkpointer(directory, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {directory}")
    meta = ckpt.restore_meta(step)
  finally:
    ckpt.close()
  path = os.path.join(directory, str(step), "state")
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path)).tree
  if tree.get("ema_params") is not None:
    keys = ("ema_params",)
  elif ema_key is not None and ema_key in tree["params"]:
    keys = ("params", ema_key)
  else:
    keys = ("params",)
  sub = tree
  for k in keys:
    sub = sub[k]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), sub)
  for k in reversed(keys):
    abstract = {k: abstract}
  try:
    out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise UserError(f"cannot restore checkpoint {directory}/{step}: "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  for k in keys:
    out = out[k]
  return out, meta, step


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with target shardings, the restore target for `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
