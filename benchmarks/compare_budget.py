"""The training budget of benchmarks/compare.py: each stage's step compiled as the loop
compiles it, timed warm, its FLOPs per image from XLA's cost analysis (`measure_step`), and
num_steps chosen so that every stage fills its share of a system's budget (`plan_steps`,
`apply_plan`). Imported by compare.py after `platform.configure()`."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import platform
from ldm_jax.models import codecs
from ldm_jax.sampling import load
from ldm_jax.config_schema import AUTOENCODER
from ldm_jax.errors import UserError
from ldm_jax.models.builders import build_autoencoder
from ldm_jax.train.autoencoder_task import AutoencoderTask
from ldm_jax.train.diffusion_task import DiffusionTask
from benchmarks.timing import xla_flops

# Share of a system's budget per stage (the default presets' own proportions).
STAGE_SHARES = {
    "ldm": {AUTOENCODER: 0.4, "ldm": 0.6},
    "pixel": {"pixel": 1.0},
    "cascade": {"base": 0.4, "sr16": 0.3, "sr32": 0.3},
}
AE_GAN_FRACTION = 0.25   # the last quarter of the autoencoder's steps adds the PatchGAN
COMPILE_SECONDS = 45.0   # per stage, before its first step
LOOP_OVERHEAD = 1.1      # data, metrics and checkpoints on top of the compiled step


def log(msg: str) -> None:
  print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _random_batch(config, batch: int, rng) -> dict:
  s, c = config.data.image_size, config.data.channels
  return {"image": rng.uniform(-1, 1, (batch, s, s, c)).astype(np.float32),
          "label": rng.integers(0, 10, batch).astype(np.int32)}


def _init(task):
  """The task's initial state, compiled like the loop compiles it (run-once options)."""
  key = jax.random.key(0)
  return jax.jit(task.init_state).lower(key).compile(platform.run_once_compiler_options())(key)


def _time_steps(fn, state, args, repeats: int) -> tuple:
  state = fn(state, *args)[0]  # warm-up
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(repeats):
    state = fn(state, *args)[0]
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / repeats


def _stage_task(config, stage: str, codec_params=None):
  """The task of a stage with random codec parameters (cost does not depend on them)."""
  codec, params = _codec(config, stage, codec_params)
  return DiffusionTask(config, stage, codec, 10, codec_params=params,
                       lowres_resolution=load.lowres_resolution(config, stage))


def _codec(config, stage: str, codec_params=None):
  if config[stage].codec == "pixel":
    return codecs.PixelCodec(load.stage_resolution(config, stage), config.data.channels), {}
  ae = build_autoencoder(config.autoencoder, config.data.channels)
  if codec_params is None:
    s = config.data.image_size
    codec_params = ae.init(jax.random.key(0), jnp.zeros((1, s, s, config.data.channels)))[
        "params"]
  return codecs.LatentCodec(ae, 1.0, config.data.image_size), codec_params


def measure_step(config, stage: str, repeats: int = 3) -> dict:
  """Seconds per training step (compiled, warm) and training FLOPs per image of a stage."""
  rng = np.random.default_rng(0)
  if stage == AUTOENCODER:
    task = AutoencoderTask(config)
    batch = _random_batch(config, config.train.batch_size, rng)
    out = {}
    for gan in (False, True):
      fn = jax.jit(task.make_train_step(gan), donate_argnums=0)
      state = _init(task)
      compiled = fn.lower(state, batch, jax.random.key(1)).compile()
      out[gan] = (_time_steps(compiled, state, (batch, jax.random.key(1)), repeats),
                  xla_flops(compiled) / config.train.batch_size)
    sec = (1 - AE_GAN_FRACTION) * out[False][0] + AE_GAN_FRACTION * out[True][0]
    per_image = (1 - AE_GAN_FRACTION) * out[False][1] + AE_GAN_FRACTION * out[True][1]
    return {"sec_per_step": sec, "train_flops_per_image": per_image,
            "batch_size": int(config.train.batch_size)}
  task = _stage_task(config, stage)
  block = config[stage]
  batch = _random_batch(config, block.train.batch_size, rng)
  fn = jax.jit(task.make_train_step(), donate_argnums=0)
  state = _init(task)
  args = (batch, jax.random.key(1), task.codec_params)
  compiled = fn.lower(state, *args).compile()
  return {"sec_per_step": _time_steps(compiled, state, args, repeats),
          "train_flops_per_image": xla_flops(compiled) / block.train.batch_size,
          "batch_size": int(block.train.batch_size)}


def parse_shares(text: str) -> dict:
  """`--shares`: 'stage=share,...' (for example 'base=0.35,sr16=0.15,sr32=0.5'), applied over
  STAGE_SHARES; every system's shares must still sum to 1. Returns {system: {stage: share}}."""
  shares = {system: dict(stages) for system, stages in STAGE_SHARES.items()}
  owner = {stage: system for system, stages in STAGE_SHARES.items() for stage in stages}
  for item in filter(None, (t.strip() for t in text.split(","))):
    stage, sep, value = item.partition("=")
    if not sep or stage not in owner:
      raise UserError(f"--shares: {item!r} is not stage=share with a stage of "
                      f"{sorted(owner)}")
    try:
      share = float(value)
    except ValueError:
      raise UserError(f"--shares: {item!r}: {value!r} is not a number") from None
    if not 0 < share <= 1:
      raise UserError(f"--shares: {item!r}: a share is in (0, 1]")
    shares[owner[stage]][stage] = share
  for system, stages in shares.items():
    if abs(sum(stages.values()) - 1) > 1e-6:
      raise UserError(f"--shares: the shares of {system} ({stages}) sum to "
                      f"{sum(stages.values()):g}, not 1")
  return shares


def plan_steps(config, system: str, budget_s: float, points: int, steps_cap: int,
               shares: dict = None) -> dict:
  """Measures each stage and picks its num_steps (a multiple of `points`) to fill its share
  of the budget (`shares`: parse_shares' result; None = STAGE_SHARES)."""
  plan = {}
  for stage, share in (shares or STAGE_SHARES)[system].items():
    m = measure_step(config, stage)
    # The loop adds compilation (about a minute per stage here), data and logging to the
    # measured compute: plan with that overhead so the measured wall time fits the budget.
    usable = max(0.0, budget_s * share - COMPILE_SECONDS)
    steps = int(usable / (m["sec_per_step"] * LOOP_OVERHEAD)) // points * points
    steps = max(points * 2, steps)
    if steps_cap:
      steps = min(steps, max(points * 2, steps_cap // points * points))
    plan[stage] = {**m, "num_steps": steps}
    log(f"{system}/{stage}: {m['sec_per_step']:.3f} s/step, "
        f"{m['train_flops_per_image'] / 1e9:.3f} GFLOP/image -> {steps} steps")
  return plan


def apply_plan(config, plan: dict, points: int) -> None:
  """Sets each stage's steps; checkpoints at every curve point are kept."""
  for stage, p in plan.items():
    steps = p["num_steps"]
    train = config.train if stage == AUTOENCODER else config[stage].train
    optim = config.optim if stage == AUTOENCODER else config[stage].optim
    train.update(num_steps=steps, checkpoint_every=steps // points, eval_every=steps,
                 keep_checkpoints=points + 1, log_every=max(1, min(50, steps // 10)))
    optim.warmup_steps = min(int(optim.warmup_steps), max(1, steps // 10))
    if stage == AUTOENCODER:
      config.loss.disc_start = int(steps * (1 - AE_GAN_FRACTION))
      config.train.update(eval_max_examples=1000, num_eval_images=8)
    else:
      config[stage].sample.update(num_samples=16, steps=min(25, config[stage].sample.steps))
