"""Meshes and faults in one process (8 fake CPU devices): partition rules, sharded == single
device, the non-finite guard, and restoring a checkpoint onto other meshes."""
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax import platform, sharding
from ldm_jax.checkpoint import Checkpointer, abstract_like
from ldm_jax.errors import UserError
from ldm_jax.train import loop
from ldm_jax.train.autoencoder_task import AutoencoderTask

ROOT = pathlib.Path(__file__).parents[1]
from configs import autoencoder as ae_configs


def tiny_config(**train):
  c = ae_configs.get_config("smoke")
  c.autoencoder.update(ch=8, num_groups=8)
  c.discriminator.update(ndf=8)
  c.mesh.fsdp_min_size = 64  # so that most parameters of the tiny model really are split
  # Conv biases in front of a GroupNorm get no gradient in exact arithmetic, so Adam's
  # g / (sqrt(v) + eps) turns rounding noise (~1e-9) into +-lr steps that differ with the
  # reduction order; a larger eps keeps such steps below 1% of lr.
  c.optim.eps = 1e-4
  c.optim.warmup_steps = 2
  c.train.update(batch_size=16, num_steps=4, log_every=1, checkpoint_every=2,
                 async_checkpoint=False, progress_every_secs=1000.0)
  c.train.update(**train)
  return c


def mesh_of(data, fsdp, tensor=1, n=None):
  devices = jax.devices()[:n or data * fsdp * tensor]
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp,
                                                           tensor=tensor)), devices)


def random_batch(rng, n=16):
  return {"image": rng.uniform(-1, 1, (n, 32, 32, 1)).astype(np.float32),
          "label": np.zeros(n, np.int32)}


def test_partition_rules_shard_state_and_follow_params():
  mesh = mesh_of(1, 4, 2)
  task = AutoencoderTask(tiny_config())
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  sh = sharding.state_shardings(abstract, mesh, *sharding.partition_rules(task.config.mesh))
  params = sh.params["autoencoder"]["encoder"]["mid_attn"]
  assert params["qkv"]["kernel"].spec == P("fsdp", "tensor")
  assert params["qkv"]["bias"].spec == P("tensor")
  assert params["proj_out"]["kernel"].spec == P("tensor", "fsdp")
  # Adam's moments follow the parameters (the rules match path suffixes).
  flat = {sharding._path_name(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh)}
  for name, spec in flat.items():
    if "/mu/" in name:
      assert flat["params/" + name.split("/mu/")[1]] == spec, name
  # The FSDP default shards the largest divisible dimension of arrays >= fsdp_min_size.
  tree = {"big": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
          "small": jax.ShapeDtypeStruct((128,), jnp.float32),
          "odd": jax.ShapeDtypeStruct((6, 5), jnp.float32)}
  out = sharding.state_shardings(tree, mesh, rules=[("odd", ("fsdp", "tensor"))])
  assert out["big"].spec == P(None, None, None, "fsdp")
  assert out["small"].spec == P()
  assert out["odd"].spec == P(None, None)  # 6 % 4 and 5 % 2: both axes dropped
  bad = ml_collections.ConfigDict(dict(rules=(("x", ("model",)),)))
  with pytest.raises(UserError, match=r"mesh\.rules\[0\].*'model'"):
    sharding.partition_rules(bad)
  with pytest.raises(UserError, match=r"config\.mesh .*needs 16 devices"):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=2)))
  with pytest.raises(UserError, match=r"train\.batch_size=12"):
    sharding.check_batch_size(12, mesh_of(1, 8))


def _train_steps(task, mesh, n, make_batch=random_batch):
  """n guarded steps (the loop's compiled program, GAN-free for the autoencoder) of `task` on
  `mesh`, batches `make_batch(rng)`; per-step metrics and the final state."""
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  shardings = sharding.state_shardings(abstract, mesh,
                                       *sharding.partition_rules(task.config.mesh))
  state = loop.init_state(task, jax.random.key(0), shardings)
  batch_abstract = loop.batch_spec(16, 32, 1, mesh, task.batch_keys())
  # Compiled at backend optimisation level 0 (as the loop compiles init): 5x faster to compile
  # on XLA:CPU; every mesh is compiled the same way. The step-0 program: GAN-free for the
  # autoencoder (disc_start > 0 in tiny_config), whose adaptive GAN weight, a ratio of
  # gradient norms, amplifies rounding differences.
  step = loop.StepCompiler(task, abstract_like(abstract, shardings), shardings, batch_abstract,
                           mesh, constants=task.step_constants(),
                           compiler_options=platform.run_once_compiler_options())(
                               task.step_variant(0))
  constants = [sharding.replicate(c, mesh) for c in task.step_constants()]
  rng = np.random.default_rng(0)
  history = []
  for _ in range(n):
    batch = sharding.put_batch(make_batch(rng), sharding.batch_sharding(mesh))
    state, metrics, ok = step(state, batch, sharding.replicate(jax.random.key(1), mesh),
                              *constants)
    assert bool(ok)
    history.append({k: float(v) for k, v in metrics.compute().items()})
  return state, history


def test_meshes_give_the_same_losses_as_one_device():
  config = tiny_config()
  task = AutoencoderTask(config)
  s1, h1 = _train_steps(task, mesh_of(1, 1), 5)
  for axes in ((8, 1, 1), (2, 4, 1), (1, 8, 1)):
    s8, h8 = _train_steps(task, mesh_of(*axes), 5)
    if axes[1] > 1:
      assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(s8.params))
    for a, b in zip(h1, h8):
      for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (axes, k)
    paths = jax.tree_util.tree_leaves_with_path(s1.params)
    for (path, a), b in zip(paths, jax.tree.leaves(s8.params)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                                 atol=0.05 * config.optim.lr,
                                 err_msg=f"{axes} {jax.tree_util.keystr(path)}")


def _stream(nan_steps=()):
  def batches(start):
    for step in range(start, 10 ** 6):
      b = random_batch(np.random.default_rng(step))
      if step in nan_steps:
        b["image"][0, 0, 0, 0] = np.nan
      yield b
  return batches


def _stage(config, workdir, mesh, batches):
  task = AutoencoderTask(config)
  return loop.train_stage(task, train_cfg=config.train, seed=0, image_shape=(32, 1),
                          stage_dir=str(workdir), mesh=mesh, batches=batches,
                          compiler_options=platform.run_once_compiler_options())


def _restore(config, workdir, mesh, step=None):
  task = AutoencoderTask(config)
  abstract = jax.eval_shape(task.init_state, jax.random.key(0))
  sh = sharding.state_shardings(abstract, mesh, *sharding.partition_rules(config.mesh))
  ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
  try:
    return ckpt.restore(abstract_like(abstract, sh), step)[0]
  finally:
    ckpt.close()


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nonfinite_guard_then_elastic_restore(tmp_path):
  mesh8 = mesh_of(8, 1)
  # 'stop': the run ends naming the step; no checkpoint of that step or later is written.
  config = tiny_config(num_steps=4, nonfinite="stop")
  with pytest.raises(FloatingPointError, match="at step 3"):
    _stage(config, tmp_path / "stop", mesh8, _stream(nan_steps={2}))
  ckpt = Checkpointer(str(tmp_path / "stop" / "checkpoints"))
  assert list(ckpt.all_steps()) == [2]
  ckpt.close()
  # 'skip': the update of the bad step is not applied, the run goes on, checkpoints are finite.
  config = tiny_config(num_steps=4, nonfinite="skip", checkpoint_every=1, keep_checkpoints=5)
  state, _ = _stage(config, tmp_path / "skip", mesh8, _stream(nan_steps={2}))
  saved2 = _restore(config, tmp_path / "skip", mesh8, 2)
  saved3 = _restore(config, tmp_path / "skip", mesh8, 3)
  _assert_same(saved3.params, saved2.params)
  _assert_same(saved3.opt_state, saved2.opt_state)
  assert int(saved3.step) == 3 and int(state.step) == 4
  _assert_same(_restore(config, tmp_path / "stop", mesh8, 2).params, saved2.params)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))
  with pytest.raises(UserError, match=r"train\.nonfinite='ignore'"):
    _stage(tiny_config(nonfinite="ignore"), tmp_path / "bad", mesh8, _stream())

  # Elastic restore: the step-4 checkpoint (written on data=8) onto other meshes.
  for axes in ((1, 4, 2), (1, 1, 1), (2, 2, 1)):
    mesh = mesh_of(*axes)
    restored = _restore(config, tmp_path / "skip", mesh)
    _assert_same(restored.params, state.params)
    _assert_same(restored.opt_state, state.opt_state)
    if axes == (1, 4, 2):
      assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored.params))
  # ... and training continues there (data=2 x fsdp=2, 4 devices).
  config.train.num_steps = 6
  cont, last = _stage(config, tmp_path / "skip", mesh_of(2, 2), _stream(nan_steps={2}))
  assert int(cont.step) == 6 and np.isfinite(last["loss"])


def test_single_process_sigterm_sets_the_preemption_flag():
  import os
  import signal
  from ldm_jax import distributed
  before = signal.getsignal(signal.SIGTERM)
  with distributed.PreemptionWatch() as watch:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before
  with pytest.raises(UserError, match="--process_id=2"):
    distributed.initialize(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2)


def test_stage2_meshes_give_the_same_losses_as_one_device():
  """The text-conditioned diffusion step (UNet + cross-attention + text encoder, frozen
  autoencoder as a step constant) on data x fsdp x tensor meshes equals one device."""
  from ldm_jax.data import CLASS_NAMES
  from ldm_jax.models.autoencoder import AutoencoderKL
  from ldm_jax.models.conditioning import Tokenizer, fashion_mnist_captions
  from ldm_jax.models.codecs import LatentCodec
  from ldm_jax.train.diffusion_task import DiffusionTask
  from ldm_jax.train.diffusion_stage import caption_vocabulary
  from configs import ldm as ldm_configs
  config = ldm_configs.get_config("text")
  config.ldm.unet.update(model_channels=16, num_res_blocks=1, attention_levels=(1,),
                         num_head_channels=8, num_groups=8)
  config.ldm.conditioning.update(text_width=16, text_depth=1, text_heads=2)
  # Zero-initialised output layers give some kernels rounding-level gradients in the first
  # steps, which Adam's g / (sqrt(v) + eps) would turn into reduction-order-dependent +-lr
  # steps (as in tiny_config above); a larger eps keeps such steps small.
  config.ldm.optim.update(warmup_steps=1, eps=1e-4)
  config.mesh.fsdp_min_size = 64
  ae = AutoencoderKL(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, in_channels=1, num_groups=8)
  ae_params = ae.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
  tok = Tokenizer.from_captions(caption_vocabulary(CLASS_NAMES))
  task = DiffusionTask(config, "ldm", LatentCodec(ae, 1.0, 32), 10, tok, codec_params=ae_params)
  length = config.ldm.conditioning.max_length

  def captioned_batch(rng):
    b = random_batch(rng)
    b["label"] = rng.integers(0, 10, 16).astype(np.int32)
    b["tokens"], b["token_mask"] = tok.encode(
        fashion_mnist_captions(b["label"], CLASS_NAMES, rng), length)
    return b

  s1, h1 = _train_steps(task, mesh_of(1, 1), 3, captioned_batch)
  s8, h8 = _train_steps(task, mesh_of(2, 2, 2), 3, captioned_batch)
  specs = {x.sharding.spec for x in jax.tree.leaves(s8.params)}
  assert any("tensor" in spec for spec in specs) and any("fsdp" in spec for spec in specs)
  for a, b in zip(h1, h8):
    for k in a:
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
  # Parameters: every element within 0.2 lr (the rounding-noise steps above: measured up to
  # 0.07 lr, in the zero-initialised middle-attention output kernel), and all but a few
  # elements equal to 1e-5 relative.
  close, total = 0, 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1.params),
                          jax.tree.leaves(s8.params)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=0.2 * config.ldm.optim.lr,
                               err_msg=jax.tree_util.keystr(path))
    close += int(np.sum(np.abs(b - a) <= 1e-6 + 1e-5 * np.abs(a)))
    total += a.size
  assert close >= 0.995 * total, (close, total)


def test_super_resolution_stage_meshes_give_the_same_losses_as_one_device():
  """A cascade's SR step (pixel codec, low-resolution conditioning with augmentation) on a
  data x fsdp mesh equals one device: the same loop, shardings and guard as the LDM."""
  from ldm_jax import workdir as workdir_lib
  from ldm_jax.models import codecs
  from ldm_jax.train.diffusion_task import DiffusionTask
  from configs import cascade as cascade_configs
  config = workdir_lib.migrate(cascade_configs.get_config("smoke"))
  config.sr16.optim.update(warmup_steps=1, eps=1e-4)
  config.mesh.fsdp_min_size = 64
  task = DiffusionTask(config, "sr16", codecs.PixelCodec(16, 1), 10, lowres_resolution=8)

  def labelled(rng):
    b = random_batch(rng)
    b["label"] = rng.integers(0, 10, 16).astype(np.int32)
    return b

  s1, h1 = _train_steps(task, mesh_of(1, 1), 3, labelled)
  s8, h8 = _train_steps(task, mesh_of(4, 2), 3, labelled)
  assert any("fsdp" in x.sharding.spec for x in jax.tree.leaves(s8.params))
  for a, b in zip(h1, h8):
    for k in a:
      assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
