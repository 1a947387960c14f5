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
  task.config.mesh               (optional) partition rules, see sharding.partition_rules

Faults: every compiled step checks that its metrics (the loss) and the updated parameters,
optimizer state and EMA are finite, and if not keeps the previous ones (`jnp.where`, no host
sync); the host reads these flags at log and checkpoint steps and stops the run naming the
first bad step (`train.nonfinite='stop'`) or logs the skipped steps ('skip'). A checkpoint is
written only after the flags up to its step are read and the state is checked to be finite.
After every step all processes ask `PreemptionWatch` whether to save and exit (SIGTERM).
"""
import concurrent.futures
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from clu import periodic_actions

from ldm_jax import console, distributed, platform, sharding
from ldm_jax.checkpoint import Checkpointer, abstract_like
from ldm_jax.data import compare_fingerprints
from ldm_jax.errors import UserError
from ldm_jax.train.state import all_finite, keep_if_not
from ldm_jax.train.writers import create_writer

NONFINITE_CHOICES = ("stop", "skip")

EvalCallback = Callable[[Any, int, Any], None]


def batch_spec(global_batch: int, image_size: int, channels: int, mesh,
               extra: Optional[dict] = None) -> dict:
  """Shaped placeholders of a global training batch, for ahead-of-time compilation."""
  sh = sharding.batch_sharding(mesh)
  keys = {"image": ((image_size, image_size, channels), jnp.float32), "label": ((), jnp.int32),
          **(extra or {})}
  return {k: jax.ShapeDtypeStruct((global_batch,) + tuple(shape), dtype, sharding=sh)
          for k, (shape, dtype) in keys.items()}


def with_params(state, params, abstract, shardings, name: str):
  """`state` with `params` (host arrays) as its parameters and EMA, on the state's shardings;
  one line naming the first leaf that does not fit."""
  want = jax.tree_util.tree_flatten_with_path(abstract.params)[0]
  got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, spec in want:
    if path not in got or tuple(np.shape(got[path])) != tuple(spec.shape):
      shape = tuple(np.shape(got[path])) if path in got else "missing"
      raise UserError(f"{name}: the initial parameters do not fit the model: "
                      f"{jax.tree_util.keystr(path)} is {shape}, the model needs "
                      f"{tuple(spec.shape)}")
  if len(got) != len(want):
    raise UserError(f"{name}: the initial parameters hold {len(got) - len(want)} leaves the "
                    "model does not have")
  params = jax.tree.map(lambda x, s: np.asarray(x, s.dtype), params, abstract.params)
  state = state.replace(params=jax.device_put(params, shardings.params))
  if state.ema_params is not None:
    state = state.replace(ema_params=jax.device_put(state.ema_select(params),
                                                    shardings.ema_params))
  return state


def init_state(task, rng, shardings):
  """task.init_state(rng) created directly with `shardings` (never whole on one device)."""
  return jax.jit(task.init_state, out_shardings=shardings).lower(rng).compile(
      compiler_options=platform.run_once_compiler_options())(rng)


def guarded_step(step_fn):
  """Wraps a task step: (state, batch, rng, *c) -> (state, metrics, ok).

  `ok` (a replicated bool) says whether the metrics and the updated state are finite; when not,
  the previous parameters, optimizer state and EMA are kept and the step's metrics are zeroed
  (clu Average totals and counts, so an accumulated average leaves the step out).
  """
  def step(state, batch, rng, *constants):
    new, metrics = step_fn(state, batch, rng, *constants)
    ok = (all_finite(metrics) & all_finite(new.params) & all_finite(new.opt_state)
          & all_finite(new.ema_params))
    new = keep_if_not(ok, new, state)
    metrics = jax.tree.map(lambda m: jnp.where(ok, m, jnp.zeros_like(m)), metrics)
    return new, metrics, ok
  return step


class CompileInterrupted(Exception):
  """A preemption signal arrived while the loop waited for a step program to compile."""


class StepCompiler:
  """Compiles each (guarded) step variant once, ahead of time, with explicit shardings and
  donation of the state.

  `start(variants)` compiles the variants a run will use in a background thread, in order, so
  that a variant needed mid-run (the GAN step at loss.disc_start) is usually ready when its
  first step comes; `get(variant, interrupted)` waits for one, polling `interrupted()` so that
  a preemption signal is honoured within a fraction of a second instead of after a compile
  that can take minutes (XLA compiles outside the GIL; the thread is a daemon, so an exit
  does not wait for a compile nobody needs any more).
  """

  POLL_S = 0.2

  def __init__(self, task, abstract_state, state_shardings, batch_abstract, mesh,
               constants=(), compiler_options=None):
    self._task, self._mesh = task, mesh
    self._options = compiler_options
    repl = sharding.replicated(mesh)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
    self._args = (abstract_state, batch_abstract, rng) + tuple(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), c)
        for c in constants)
    self._in_shardings = (state_shardings, sharding.batch_sharding(mesh), repl) + (
        (repl,) * len(constants))
    self._out_shardings = (state_shardings, repl, repl)
    self._compiled = {}
    self._futures = {}
    self.timings = {}  # variant -> {'trace_lower_s', 'compile_s'}

  def _compile(self, variant):
    fn = jax.jit(guarded_step(self._task.make_train_step(variant)),
                 in_shardings=self._in_shardings,
                 out_shardings=self._out_shardings, donate_argnums=0)
    logging.info("compiling %s step (variant %r)", self._task.name, variant)
    t0 = time.perf_counter()
    lowered = fn.lower(*self._args)
    t1 = time.perf_counter()
    compiled = lowered.compile(self._options)
    self.timings[variant] = dict(trace_lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
    logging.info("%s step (variant %r): traced and lowered in %.1f s, compiled (or loaded "
                 "from the compilation cache) in %.1f s", self._task.name, variant,
                 *self.timings[variant].values())
    return compiled

  def start(self, variants) -> None:
    """Compiles `variants` (in this order) in one background thread."""
    pending = [v for v in variants if v not in self._futures]
    for v in pending:
      self._futures[v] = concurrent.futures.Future()

    def work():
      for v in pending:
        future = self._futures[v]
        try:
          future.set_result(self._compile(v))
        except BaseException as e:  # pylint: disable=broad-except  (handed to the waiter)
          future.set_exception(e)
    threading.Thread(target=work, name=f"compile_{self._task.name}", daemon=True).start()

  def get(self, variant, interrupted: Callable[[], bool] = lambda: False):
    """The compiled program of `variant`; raises CompileInterrupted if `interrupted()` turns
    True while it is still compiling."""
    if variant in self._compiled:
      return self._compiled[variant]
    if variant not in self._futures:
      self.start([variant])
    future = self._futures[variant]
    if not future.done():
      logging.info("%s: waiting for the step program (variant %r) to compile",
                   self._task.name, variant)
    while True:
      try:
        compiled = future.result(timeout=self.POLL_S)
        break
      except concurrent.futures.TimeoutError:
        if interrupted():
          raise CompileInterrupted(variant) from None
    self._compiled[variant] = compiled
    return compiled

  def __call__(self, variant):
    return self.get(variant)


class _FiniteFlags:
  """The per-step `ok` flags of the guarded step, read in bulk only at sync points."""

  def __init__(self, mode: str, key: str):
    self.mode, self.key = mode, key
    self._pending = []
    self.skipped = []

  def add(self, step: int, ok) -> None:
    self._pending.append((step, ok))

  def check(self) -> None:
    """Raises FloatingPointError naming the first non-finite step (mode 'stop')."""
    if not self._pending:
      return
    steps, flags = zip(*self._pending)
    self._pending = []
    bad = [s for s, ok in zip(steps, jax.device_get(list(flags))) if not bool(ok)]
    if not bad:
      return
    if self.mode == "stop":
      raise FloatingPointError(
          f"non-finite loss or update at step {bad[0]}: the update was not applied and no "
          f"checkpoint of it is written (config.{self.key}.nonfinite='skip' skips such steps)")
    self.skipped.extend(bad)
    logging.warning("non-finite loss or update at step(s) %s: update(s) skipped", bad)


def _save(ckpt: Checkpointer, step: int, state, meta: dict, finite_fn) -> None:
  if not bool(finite_fn(state)):
    raise FloatingPointError(f"the train state at step {step} is not finite; not writing a "
                             f"checkpoint to {ckpt.directory}")
  ckpt.save(step, state, meta, force=True)


def train_stage(task, *, train_cfg, seed: int, image_shape: tuple[int, int], stage_dir: str,
                mesh, batches: Callable[[int], Iterator[dict]],
                on_eval: Optional[EvalCallback] = None, meta: Optional[dict] = None,
                train_key: str = "train", compiler_options: Optional[dict] = None,
                initial_params: Any = None) -> Any:
  """Trains `task` to train_cfg.num_steps, resuming from stage_dir/checkpoints if present.

  `image_shape` is (image_size, channels) of the batches; `batches(start_step)` yields
  host-local numpy batches for steps start_step, start_step+1, ... (this process's rows);
  `meta` is extra JSON saved with every checkpoint; `train_key` is where train_cfg lives in
  the config (for messages); `compiler_options` go to XLA for the step (tests use
  platform.run_once_compiler_options() to compile faster). Every process runs this in
  lockstep. Returns the final state (on the mesh) and the last logged scalars ({} if none
  ran). `initial_params` (host arrays shaped as the task's parameters, e.g. a fine-tune's
  source model) replace the random parameters and the EMA at step 0, put on the mesh with the
  state's shardings; a resume reads its checkpoint instead. Raises `Preempted` after saving
  when any process got SIGTERM, FloatingPointError on a non-finite step in 'stop' mode.
  """
  tc = train_cfg
  mode = tc.get("nonfinite", "stop")
  if mode not in NONFINITE_CHOICES:
    raise UserError(f"config.{train_key}.nonfinite={mode!r} is not one of "
                    f"{list(NONFINITE_CHOICES)}")
  sharding.check_batch_size(tc.batch_size, mesh, f"{train_key}.batch_size")
  sharding.check_local_rows(mesh, tc.batch_size)
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), keep=tc.keep_checkpoints,
                      save_every=tc.checkpoint_every, async_save=tc.async_checkpoint)
  init_rng, step_rng = jax.random.split(jax.random.key(seed))
  abstract = jax.eval_shape(task.init_state, init_rng)
  rules, min_size = sharding.partition_rules(getattr(getattr(task, "config", None), "mesh",
                                                     None))
  shardings = sharding.state_shardings(abstract, mesh, rules, min_size)
  meta = {"global_batch": int(tc.batch_size), "seed": int(seed), **(meta or {})}
  if ckpt.latest_step() is None:
    state = init_state(task, init_rng, shardings)
    if initial_params is not None:
      state = with_params(state, initial_params, abstract, shardings, task.name)
    start = 0
  else:
    # Elastic: the target shardings are this run's mesh, whatever mesh wrote the checkpoint.
    # A damaged newest step falls back to the newest one that restores (never to step 0).
    state, saved, start = ckpt.restore_newest(abstract_like(abstract, shardings),
                                              quarantine=True)
    for key, name in (("global_batch", f"{train_key}.batch_size"), ("seed", "seed")):
      if saved.get(key) != meta[key]:
        raise UserError(f"config.{name}={meta[key]} differs from {saved.get(key)} in the "
                        f"checkpoint {ckpt.directory}/{start}; the data stream would not resume")
    changed = compare_fingerprints(saved.get("data_fingerprint"), meta.get("data_fingerprint"))
    if changed:
      logging.warning("%s: %s (checkpoint %s/%d)", task.name, changed, ckpt.directory, start)
    console.say(f"{task.name}: resumed from {ckpt.directory} at step {start}")

  num_steps = int(tc.num_steps)
  if start >= num_steps:
    ckpt.close()
    return state, {}
  batch_abstract = batch_spec(tc.batch_size, *image_shape, mesh, task.batch_keys())
  constants = sharding.replicate(task.step_constants(), mesh)
  compile_step = StepCompiler(task, abstract_like(abstract, shardings), shardings,
                              batch_abstract, mesh, constants, compiler_options)
  finite_fn = jax.jit(all_finite, out_shardings=sharding.replicated(mesh))
  batch_sh = sharding.batch_sharding(mesh)
  step_rng = sharding.replicate(step_rng, mesh)

  writer = create_writer(stage_dir, resume_step=start)
  progress = console.Progress(task.name, num_steps, start=start,
                              every_secs=tc.progress_every_secs)
  hooks = []
  if tc.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=stage_dir, num_profile_steps=5))
  accumulated, scalars = None, {}
  flags = _FiniteFlags(mode, train_key)
  stream = batches(start)
  watch = distributed.installed_preemption_watch()
  own_watch = watch is None
  if own_watch:
    watch = distributed.PreemptionWatch()

  def log(done):
    nonlocal accumulated, scalars
    flags.check()
    if accumulated is None:
      return
    scalars = {k: float(v) for k, v in accumulated.compute().items()}
    accumulated = None
    # flags.check() has vouched for every step's metrics; only a 'skip' window of skipped
    # steps alone averages 0 / 0.
    scalars = {k: v for k, v in scalars.items() if np.isfinite(v)}
    if scalars:
      rate = progress.rate()
      writer.write_scalars(done, {**scalars, **({"steps_per_sec": rate} if rate else {})})

  def preempt(done, saved):
    if not saved:
      # The guarded step never lets a non-finite update into the state; checking it on the
      # host here avoids compiling `finite_fn` while the clock of a grace period runs.
      if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(
          jax.tree.map(jax.device_get, state)) if np.issubdtype(np.asarray(x).dtype,
                                                                 np.floating)):
        raise FloatingPointError(f"the train state at step {done} is not finite")
      ckpt.save(done, state, meta, force=True)
    ckpt.wait()
    logging.warning("%s: preempted, saved step %d", task.name, done)
    return distributed.Preempted(done, ckpt.directory)

  saved_step = start if ckpt.latest_step() == start else None
  try:
    # Every variant this run will use, compiled in the background in order of first use.
    compile_step.start(dict.fromkeys(task.step_variant(s) for s in range(start, num_steps)))
    for step in range(start, num_steps):
      try:
        step_fn = compile_step.get(task.step_variant(step), watch.signalled)
      except CompileInterrupted:
        log(step)
        raise preempt(step, saved_step == step) from None
      if step == start:
        distributed.barrier(f"{task.name}_first_step")
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.put_batch(next(stream), batch_sh)
        state, step_metrics, ok = step_fn(state, batch, step_rng, *constants)
      flags.add(step + 1, ok)
      accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      preempted = watch.reached(done)
      saving = done % tc.checkpoint_every == 0 or done == num_steps or preempted
      if done % tc.log_every == 0 or saving:
        log(done)
      progress.update(done, scalars)
      if on_eval is not None and not preempted and (done % tc.eval_every == 0
                                                    or done == num_steps):
        on_eval(state, done, writer)
      if saving:
        _save(ckpt, done, state, meta, finite_fn)
        saved_step = done
      if preempted:
        raise preempt(done, saved=True)
  finally:
    progress.close()
    if own_watch:
      watch.close()
    stream.close()
    writer.flush()
    ckpt.wait()
    ckpt.close()
  return state, scalars
