"""Gradient accumulation: k in-step microbatches equal the step on the whole batch."""

import jax
import numpy as np
import pytest

from ldm_jax import platform, sharding
from ldm_jax.checkpoint import abstract_like
from ldm_jax.models.codecs import LatentCodec
from ldm_jax.errors import UserError
from ldm_jax.models.builders import build_autoencoder
from ldm_jax.train import checks
from ldm_jax.train.diffusion_task import DiffusionTask, split_microbatches
from ldm_jax.train.loop import StepCompiler, batch_spec, init_state
from ldm_jax.train.diffusion_stage import check_microbatches

from configs import ldm as ldm_configs

BATCH = 16


def _config(k: int):
  config = ldm_configs.get_config("smoke")
  config.autoencoder.update(ch=8, num_groups=8, mid_attention=False)
  block = config.ldm
  block.unet.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    attention_levels=(), mid_attention=False, num_groups=8)
  block.optim.warmup_steps = 1
  block.train.update(batch_size=BATCH, grad_accum_steps=k)
  return config


def _train(k: int, ae_params, batch, mesh, steps: int = 2):
  """`steps` steps of the guarded, sharded step the loop compiles; (losses, final params)."""
  config = _config(k)
  codec = LatentCodec(build_autoencoder(config.autoencoder, 1), 0.5, 32)
  task = DiffusionTask(config, "ldm", codec, 10, codec_params=ae_params)
  rng = jax.random.key(0)
  abstract = jax.eval_shape(task.init_state, rng)
  shardings = sharding.state_shardings(abstract, mesh, *sharding.partition_rules(config.mesh))
  state = init_state(task, rng, shardings)
  start = jax.device_get(state.params)
  constants = sharding.replicate(task.step_constants(), mesh)
  step = StepCompiler(task, abstract_like(abstract, shardings), shardings,
                      batch_spec(BATCH, 32, 1, mesh, task.batch_keys()), mesh, constants,
                      platform.run_once_compiler_options()).get(None)
  batch = sharding.put_batch(batch, sharding.batch_sharding(mesh))
  rng = sharding.replicate(jax.random.key(1), mesh)
  losses = []
  for _ in range(steps):
    state, metrics, ok = step(state, batch, rng, *constants)
    assert bool(ok)
    losses.append(float(metrics.compute()["loss"]))
  return losses, start, jax.device_get(state.params)


def test_two_microbatches_equal_the_whole_batch_on_the_mesh():
  mesh = sharding.make_mesh(_config(1).mesh)
  assert mesh.devices.size == 8
  ae = build_autoencoder(_config(1).autoencoder, 1)
  ae_params = ae.init(jax.random.key(2), np.zeros((1, 32, 32, 1), np.float32))["params"]
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (BATCH, 32, 32, 1)).astype(np.float32),
           "label": (np.arange(BATCH) % 10).astype(np.int32)}
  whole_losses, start, whole = _train(1, ae_params, batch, mesh)
  micro_losses, _, micro = _train(2, ae_params, batch, mesh)
  np.testing.assert_allclose(micro_losses, whole_losses, rtol=1e-5)
  moved = max(float(np.max(np.abs(a - b)))
              for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(start)))
  assert moved > 5e-4  # the update is not vacuous (the first one has lr 0)
  for a, b in zip(jax.tree.leaves(micro), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


def test_microbatches_interleave_rows_so_each_device_keeps_its_block():
  x = np.arange(16)
  parts = np.asarray(split_microbatches(x, 2))
  np.testing.assert_array_equal(parts, [np.arange(0, 16, 2), np.arange(1, 16, 2)])


def test_grad_accum_steps_is_checked_with_one_line():
  config = _config(3)  # 16 is not divisible by 3
  with pytest.raises(UserError, match=r"config\.ldm\.train\.grad_accum_steps=3 must be a "
                                      r"positive divisor of config\.ldm\.train\.batch_size=16"):
    checks.check_stages(config)
  config = _config(4)  # 4-example microbatches on 8 devices
  checks.check_stages(config)
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(UserError, match=r"grad_accum_steps=4: microbatches of 16 / 4 = 4"):
    check_microbatches(config.ldm.train, "ldm", mesh)
  assert check_microbatches(_config(2).ldm.train, "ldm", mesh) == 8
  config.train.grad_accum_steps = 2  # the autoencoder stage refuses the key
  with pytest.raises(UserError, match=r"config\.train\.grad_accum_steps=2: gradient "
                                      r"accumulation is for diffusion stages only"):
    checks.check_autoencoder_config(config)
