"""The training loop shared by every stage: state on the mesh, resume, compiled steps,
metrics, periodic actions and checkpoints. Stage specifics come in through a task object:

  task.name                      stage name (sub-directory of the workdir)
  task.init_state(rng)           -> TrainState (pure; jitted here with output shardings)
  task.step_variant(step)        -> hashable key selecting a compiled step program
  task.make_train_step(variant)  -> pure (state, batch, rng, *constants) -> (state, clu metrics)
  task.step_constants()          -> tuple of pytrees passed to every step (e.g. the frozen
                                    autoencoder's parameters), replicated on the mesh
  task.batch_keys()              -> {name: (shape after the batch axis, dtype)} beyond
                                    image/label
"""
import logging
import os
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from clu import periodic_actions

from ldm_jax import sharding
from ldm_jax.checkpoint import Checkpointer, abstract_like
from ldm_jax.errors import UserError
from ldm_jax.train.writers import create_writer

EvalCallback = Callable[[Any, int, Any], None]


def batch_spec(global_batch: int, image_size: int, channels: int, mesh,
               extra: Optional[dict] = None) -> dict:
  """Shaped placeholders of a global training batch, for ahead-of-time compilation."""
  sh = sharding.batch_sharding(mesh)
  keys = {"image": ((image_size, image_size, channels), jnp.float32), "label": ((), jnp.int32),
          **(extra or {})}
  return {k: jax.ShapeDtypeStruct((global_batch,) + tuple(shape), dtype, sharding=sh)
          for k, (shape, dtype) in keys.items()}


class StepCompiler:
  """Compiles each step variant once, ahead of time, with explicit shardings and donation."""

  def __init__(self, task, abstract_state, state_shardings, batch_abstract, mesh,
               constants=()):
    self._task, self._mesh = task, mesh
    repl = sharding.replicated(mesh)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
    self._args = (abstract_state, batch_abstract, rng) + tuple(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), c)
        for c in constants)
    self._in_shardings = (state_shardings, sharding.batch_sharding(mesh), repl) + (
        (repl,) * len(constants))
    self._out_shardings = (state_shardings, repl)
    self._compiled = {}

  def __call__(self, variant):
    if variant not in self._compiled:
      fn = jax.jit(self._task.make_train_step(variant), in_shardings=self._in_shardings,
                   out_shardings=self._out_shardings, donate_argnums=0)
      logging.info("compiling %s step (variant %r)", self._task.name, variant)
      self._compiled[variant] = fn.lower(*self._args).compile()
    return self._compiled[variant]


def _check_finite(scalars: dict, step: int) -> None:
  bad = {k: v for k, v in scalars.items() if not np.all(np.isfinite(v))}
  if bad:
    raise FloatingPointError(f"non-finite metrics at step {step}: {bad}; stopping before any "
                             "checkpoint of this state is written")


def train_stage(task, *, train_cfg, seed: int, image_shape: tuple[int, int], stage_dir: str,
                mesh, batches: Callable[[int], Iterator[dict]],
                on_eval: Optional[EvalCallback] = None, meta: Optional[dict] = None,
                train_key: str = "train") -> Any:
  """Trains `task` to train_cfg.num_steps, resuming from stage_dir/checkpoints if present.

  `image_shape` is (image_size, channels) of the batches; `batches(start_step)` yields
  host-local numpy batches for steps start_step, start_step+1, ...; `meta` is extra JSON saved
  with every checkpoint; `train_key` is where train_cfg lives in the config (for messages).
  Returns the final state (on the mesh) and the last logged scalars ({} if none ran).
  """
  tc = train_cfg
  sharding.check_batch_size(tc.batch_size, mesh, f"{train_key}.batch_size")
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), keep=tc.keep_checkpoints,
                      save_every=tc.checkpoint_every, async_save=tc.async_checkpoint)
  init_rng, step_rng = jax.random.split(jax.random.key(seed))
  abstract = jax.eval_shape(task.init_state, init_rng)
  shardings = sharding.state_shardings(abstract, mesh)
  meta = {"global_batch": int(tc.batch_size), "seed": int(seed), **(meta or {})}
  start = ckpt.latest_step()
  if start is None:
    state = jax.jit(task.init_state, out_shardings=shardings)(init_rng)
    start = 0
  else:
    state, saved = ckpt.restore(abstract_like(abstract, shardings), start)
    for key, name in (("global_batch", f"{train_key}.batch_size"), ("seed", "seed")):
      if saved.get(key) != meta[key]:
        raise UserError(f"config.{name}={meta[key]} differs from {saved.get(key)} in the "
                        f"checkpoint {ckpt.directory}/{start}; the data stream would not resume")
    logging.info("%s: resumed from %s at step %d", task.name, ckpt.directory, start)

  num_steps = int(tc.num_steps)
  if start >= num_steps:
    ckpt.close()
    return state, {}
  batch_abstract = batch_spec(tc.batch_size, *image_shape, mesh, task.batch_keys())
  constants = jax.device_put(task.step_constants(), sharding.replicated(mesh))
  compile_step = StepCompiler(task, abstract_like(abstract, shardings), shardings,
                              batch_abstract, mesh, constants)
  batch_sh = sharding.batch_sharding(mesh)
  step_rng = jax.device_put(step_rng, sharding.replicated(mesh))

  writer = create_writer(stage_dir)
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_secs=tc.progress_every_secs)]
  if tc.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=stage_dir, num_profile_steps=5))
  accumulated, scalars = None, {}
  stream = batches(start)
  try:
    for step in range(start, num_steps):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.put_batch(next(stream), batch_sh)
        state, step_metrics = compile_step(task.step_variant(step))(state, batch, step_rng,
                                                                    *constants)
      accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      saving = done % tc.checkpoint_every == 0 or done == num_steps
      if done % tc.log_every == 0 or saving:
        scalars = {k: float(v) for k, v in accumulated.compute().items()}
        accumulated = None
        _check_finite(scalars, done)
        writer.write_scalars(done, scalars)
      if on_eval is not None and (done % tc.eval_every == 0 or done == num_steps):
        on_eval(state, done, writer)
      if saving:
        ckpt.save(done, state, meta, force=True)
  finally:
    stream.close()
    writer.flush()
    ckpt.wait()
    ckpt.close()
  return state, scalars
