"""Orbax CheckpointManager wrapper: async, keep-N, atomic saves of a train state plus JSON
metadata (data position, latent scale, ...), restored onto any mesh via target shardings."""
import glob
import logging
import os
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store

from ldm_jax import distributed
from ldm_jax.errors import ConfigMismatch, UserError, is_disk_full

class DiskFull(UserError):
  """A checkpoint could not be written for lack of space; older steps are intact."""


DAMAGED = "damaged"  # sub-directory of the checkpoint directory that holds skipped steps

# orbax writes a replicated array as slices split over its replicas ("replica-parallel"); each
# slice is a small jitted program, compiled on first use: with a model's few hundred parameter
# shapes that made the first save cost tens of seconds (47 s measured on 2 CPU cores beside a
# background compile), too slow for a preemption grace period. Slicing pays off only for
# large arrays, so it is kept for slices of >= 4 MiB (orbax's own handler, one option changed).
_MIN_REPLICA_SLICE_BYTES = 4 << 20
_handler_registered = False


class _NoOverrideWarning(logging.Filter):
  """Drops orbax's 'Type handler registry type ... overriding' warning: replacing its jax.Array
  handler is what `_register_array_handler` means to do (its public register_type_handler has
  no way to say so), and the line otherwise shows in every command's output."""

  def filter(self, record):
    return not record.getMessage().startswith("Type handler registry type")


def _register_array_handler() -> None:
  global _handler_registered
  if not _handler_registered:
    quiet = _NoOverrideWarning()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(
              min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES,
              # As orbax's default handler: the per-array metadata files stay written.
              array_metadata_store=array_metadata_store.Store()), override=True)
    finally:
      absl_logger.removeFilter(quiet)
    _handler_registered = True


def _reason(e: BaseException) -> str:
  """The first line of an exception's message (orbax/tensorstore errors run to many lines)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


class Checkpointer:
  """Saves `{'state': pytree, 'meta': json dict}` under `directory/<step>/`."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True, read_only: bool = False):
    """`read_only`: a reader beside a running trainer (sample.py, evaluate): it never creates,
    deletes or cleans anything under `directory`, and lists only complete steps."""
    self.directory = os.path.abspath(directory)
    _register_array_handler()
    if read_only:
      # Not orbax's read_only option, which logs a warning on every use: a manager that is
      # never asked to save creates, deletes and cleans nothing with these options.
      options = ocp.CheckpointManagerOptions(create=False, max_to_keep=None,
                                             cleanup_tmp_directories=False,
                                             enable_async_checkpointing=False)
    else:
      # The partial step directories of a killed run are removed on start: a writer is the
      # only one (train/lock.py), so no other save can be in flight under them.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, save_interval_steps=save_every,
          enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
    self._in_flight: Optional[int] = None  # the step of the last save started
    self._failed = False  # a save hit a full disk; the manager is closed

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def all_steps(self):
    return self._manager.all_steps()

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Starts (async) or writes step `step`; a full disk raises DiskFull (one line)."""
    if self._failed:
      raise UserError(f"{self.directory}: an earlier save failed; not writing step {step}")
    try:
      saving = self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # pylint: disable=broad-except  (a full disk becomes one line)
      self._raise_if_disk_full(e, step)
      raise
    if saving:
      self._in_flight = step
    return saving

  def _raise_if_disk_full(self, error: BaseException, step: int) -> None:
    """On a full disk: lets orbax's threads end, removes the partial step directories (orbax
    would only clean them up on the next start) and raises DiskFull naming the step that was
    being written and the newest complete step, which is kept."""
    if not is_disk_full(error):
      return
    self._failed = True
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except
      if not is_disk_full(e):  # the same failure again is expected; anything else is not
        raise
    partial = sorted(glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")))
    if jax.process_index() == 0:
      for path in partial:
        shutil.rmtree(path)
    written = [int(n) for n in os.listdir(self.directory) if n.isdigit()]
    failed = [int(os.path.basename(p).split(".")[0]) for p in partial
              if os.path.basename(p).split(".")[0].isdigit()]
    failed_step = max(failed) if failed else (self._in_flight or step)
    kept = f"step {max(written)} kept" if written else "no earlier checkpoint"
    raise DiskFull(f"no space left on device while writing checkpoint {failed_step} under "
                   f"{self.directory}; {kept}") from error

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores step `step` onto the shardings carried by `abstract_state`
    (jax.ShapeDtypeStruct leaves); one UserError line naming the step when it cannot."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint found in {self.directory}")
    try:
      out = self._restore(abstract_state, step)
    except Exception as e:  # pylint: disable=broad-except  (tensorstore raises bare Exception)
      raise UserError(f"cannot restore checkpoint {self.directory}/{step}: {_reason(e)}") from e
    return out.state, out.meta

  def _restore(self, abstract_state, step):
    return self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))

  def restore_newest(self, abstract_state: Any, *, quarantine: bool) -> tuple[Any, dict, int]:
    """(state, meta, step) of the newest checkpoint that restores.

    A step that fails to restore (a truncated, corrupted or missing file) is skipped with one
    warning naming it and why; with `quarantine` (a run that will write here again) the
    skipped steps are moved to `<directory>/damaged/<step>` (kept for inspection, out of
    orbax's way) by process 0. Raises UserError naming the directory when no step restores.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        out = self._restore(abstract_state, step)
      except Exception as e:  # pylint: disable=broad-except  (recorded, reported, re-raised)
        misfit = self.misfit(abstract_state, step)
        if misfit:  # not damage: the config changed since the step was saved
          raise ConfigMismatch(f"checkpoint {self.directory}/{step} does not fit the config "
                          f"({misfit}): the config changed since it was saved; train the new "
                          "config in a new --workdir") from e
        failures.append((step, e))
        logging.warning("checkpoint %s/%d does not restore (%s); trying an older step",
                        self.directory, step, _reason(e))
        continue
      if failures and quarantine:
        self._quarantine([s for s, _ in failures])
      return out.state, out.meta, step
    if not failures:
      raise UserError(f"no checkpoint found in {self.directory}")
    step, err = failures[0]
    raise UserError(f"no checkpoint in {self.directory} restores (newest, step {step}: "
                    f"{_reason(err)})") from err

  def misfit(self, abstract_state: Any, step: int) -> str | None:
    """How the arrays saved at `step` differ from `abstract_state` in names or shapes (from
    the checkpoint's metadata; None when they match or the metadata itself does not read)."""
    path = epath.Path(os.path.join(self.directory, str(step), "state"))
    try:
      saved = ocp.PyTreeCheckpointHandler().metadata(path).tree
    except Exception:  # pylint: disable=broad-except  (unreadable metadata: damage, not misfit)
      return None
    return tree_misfit({_dotted(p): tuple(getattr(m, "shape", ())) for p, m in _leaves(saved)},
                       {_dotted(p): tuple(a.shape) for p, a in _leaves(abstract_state)})

  def _quarantine(self, steps) -> None:
    distributed.barrier("checkpoint_quarantine_read")
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.directory, DAMAGED), exist_ok=True)
      for step in steps:
        target = os.path.join(self.directory, DAMAGED, str(step))
        while os.path.exists(target):
          target += "_"
        os.rename(os.path.join(self.directory, str(step)), target)
        logging.warning("moved the damaged checkpoint step %d to %s", step, target)
    distributed.barrier("checkpoint_quarantine_done")
    self._manager.reload()

  def restore_meta(self, step: Optional[int] = None) -> dict:
    """The JSON metadata of a checkpoint, without reading its arrays (of the newest step whose
    metadata reads when `step` is None)."""
    if step is not None:
      return self._restore_meta(step)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise UserError(f"no checkpoint found in {self.directory}")
    for s in steps[:-1]:
      try:
        return self._restore_meta(s)
      except UserError as e:
        logging.warning("%s; trying an older step", e)
    return self._restore_meta(steps[-1])

  def _restore_meta(self, step: int) -> dict:
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (re-raised as one line)
      raise UserError(f"cannot read the metadata of checkpoint {self.directory}/{step}: "
                      f"{_reason(e)}") from e
    if out.meta is None:
      raise UserError(f"checkpoint {self.directory}/{step} has no metadata")
    return out.meta

  def wait(self) -> None:
    if self._failed:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (a full disk becomes one line)
      self._raise_if_disk_full(e, self._in_flight or -1)
      raise

  def close(self) -> None:
    if self._failed:  # closed when the failure was handled
      return
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except  (a full disk becomes one line)
      self._raise_if_disk_full(e, self._in_flight or -1)
      raise


def _leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def _dotted(path) -> str:
  """A jax key path as orbax names the saved array: `opt_state.1.0.mu.unet.conv_in.bias`."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def tree_misfit(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
  """The first difference between two {array name: shape} maps, as words; None if equal."""
  for name in sorted(set(saved) & set(wanted)):
    if saved[name] != wanted[name]:
      return f"{name} has shape {saved[name]} in the checkpoint, {wanted[name]} in the config"
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  if missing:
    return f"{len(missing)} array(s) of the config are not in the checkpoint, e.g. {missing[0]}"
  if extra:
    return f"{len(extra)} array(s) of the checkpoint are not in the config, e.g. {extra[0]}"
  return None


def restore_eval_params(directory: str, step: Optional[int] = None,
                        ema_key: Optional[str] = None) -> tuple[Any, dict, int]:
  """(parameters to sample with, meta, step) from a checkpoint, onto this process's first
  device, reading only those arrays: the EMA when the state has one, else `params[ema_key]`
  (or all `params`; parameters-only checkpoints of ldm_jax.convert hold just these).

  The tree comes from the checkpoint's own metadata, so no model or optimizer has to be built
  to restore it (the optimizer state is never read). With `step` None the newest step that
  restores is used: a damaged newer one is skipped with a warning (and left where it is:
  reading never writes). Beside a running trainer only complete steps are listed (orbax
  writes a step under a temporary name and renames it when complete); a step removed by the
  trainer's keep-N while it was being read is replaced by a fresh listing.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise UserError(f"no checkpoint in {directory}")
  if step is not None and step not in _complete_steps(directory):
    saved = sorted(_complete_steps(directory))
    raise UserError(f"no checkpoint step {step} in {directory}: the saved steps are "
                    f"{', '.join(map(str, saved)) if saved else 'none'}")
  tried = set()
  for _ in range(3):  # a trainer beside us may save newer steps while older ones are removed
    steps = [s for s in (_complete_steps(directory) if step is None else [step])
             if s not in tried]
    if not steps:
      break
    for i, s in enumerate(steps):
      tried.add(s)
      try:
        return _restore_eval_params(directory, s, ema_key)
      except UserError as e:
        last = e
        if i < len(steps) - 1:
          logging.warning("%s; trying an older step", e)
  if not tried:
    raise UserError(f"no checkpoint in {directory}")
  raise last


def _complete_steps(directory: str) -> list[int]:
  ckpt = Checkpointer(directory, read_only=True)
  try:
    return sorted(ckpt.all_steps(), reverse=True)
  finally:
    ckpt.close()


def _restore_eval_params(directory: str, step: int, ema_key: Optional[str]):
  ckpt = Checkpointer(directory, read_only=True)
  try:
    meta = ckpt.restore_meta(step)
  finally:
    ckpt.close()
  path = os.path.join(directory, str(step), "state")
  try:
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
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            sub)
    for k in reversed(keys):
      abstract = {k: abstract}
    out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  (tensorstore raises bare Exception)
    raise UserError(f"cannot restore checkpoint {directory}/{step}: {_reason(e)}") from e
  for k in keys:
    out = out[k]
  return out, meta, step


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with target shardings, the restore target for `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
