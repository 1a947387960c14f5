"""The stage-2 latent cache: its rows are the encoder's posterior of exactly the images the
training stream would produce (flips included), so a cached step's x_0 is the encoding step's;
it is rebuilt when the autoencoder or the data change; a cached stage resumes exactly."""
import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ldm_jax import data as data_lib
from ldm_jax import sharding
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.models.codecs import LatentCodec
from ldm_jax.models.builders import build_autoencoder
from ldm_jax.train import latent_cache
from ldm_jax.train.diffusion_stage import run_diffusion
from ldm_jax.train.writers import read_jsonl

from configs import ldm as ldm_configs

NUM_IMAGES = 24


def _folder(root: pathlib.Path) -> pathlib.Path:
  """Two classes of 32x32 and 32x35 gray images (the wide ones are center-cropped, so a
  mirrored image is not the crop of the mirrored file)."""
  rng = np.random.default_rng(0)
  for i in range(NUM_IMAGES):
    d = root / ("ab"[i % 2])
    d.mkdir(parents=True, exist_ok=True)
    width = 35 if i % 3 else 32
    pixels = rng.integers(0, 256, (32, width), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(d / f"{i:03d}.png")
  return root


def _autoencoder(seed=0):
  """The autoencoder of `_stage_config` (the smoke preset's, narrower), randomly initialised."""
  ae = build_autoencoder(_stage_config("").autoencoder, 1)
  return ae, ae.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 1)))["params"]


def _data_cfg(folder, random_flip=True):
  d = data_lib.default_data_config()
  d.update(source="folder", folder=str(folder), random_flip=random_flip, num_threads=2)
  return d


def test_cached_batches_are_the_encoding_of_the_stream_and_rebuild_when_stale(tmp_path,
                                                                              caplog):
  caplog.set_level(logging.INFO)
  folder = _folder(tmp_path / "images")
  d = _data_cfg(folder)
  source = data_lib.make_source(d, "train")
  ae, params = _autoencoder()
  codec = LatentCodec(ae, 0.5, 32)
  mesh = sharding.make_mesh(ldm_configs.get_config("smoke").mesh)
  stage_dir = str(tmp_path / "ldm")
  cache = latent_cache.open_or_build(stage_dir, codec, params, source, d, mesh, batch_size=16)
  assert "latent cache: building" in caplog.text and "none yet" in caplog.text
  assert cache.moments.shape == (NUM_IMAGES, 2, 8, 8, 8)
  assert cache.moments.dtype == np.float32

  stream = data_lib.BatchStream(source, global_batch=8, image_size=32, channels=1, seed=3,
                                random_flip=True, num_threads=1)
  cached = latent_cache.CachedBatches(cache, global_batch=8, seed=3, random_flip=True)
  moments = jax.jit(codec.moments)
  flipped = 0
  for step in (0, 2, 5):  # 5 crosses into the third epoch
    images = stream.get(step)
    batch = cached.get(step)
    np.testing.assert_array_equal(batch["label"], images["label"])
    np.testing.assert_allclose(batch["image"], moments(params, images["image"]),
                               rtol=1e-5, atol=1e-5)
    positions = step * 8 + np.arange(8)
    flipped += int(latent_cache.flip_coins(3, positions).sum())
  assert 0 < flipped < 24  # both variants were read
  # The step's x_0 from cached moments is the encoder's posterior sample with the same noise.
  images = stream.get(0)["image"]
  noise = jax.random.normal(jax.random.key(1), (8, 8, 8, 4))
  np.testing.assert_allclose(codec.from_moments(cached.get(0)["image"], noise),
                             codec.encode(params, images, jax.random.key(1)), rtol=1e-5,
                             atol=1e-5)
  # Processes read their own rows of the same global batch.
  halves = [latent_cache.CachedBatches(cache, global_batch=8, seed=3, random_flip=True,
                                       process_index=p, process_count=2).get(4)
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]),
                                cached.get(4)["image"])

  # Unchanged: reused, not rewritten.
  mtime = os.path.getmtime(os.path.join(stage_dir, "latent_cache", "moments.npy"))
  caplog.clear()
  latent_cache.open_or_build(stage_dir, codec, params, source, d, mesh, batch_size=16)
  assert "latent cache: reusing" in caplog.text
  assert os.path.getmtime(os.path.join(stage_dir, "latent_cache", "moments.npy")) == mtime
  # Another autoencoder: rebuilt, saying why, with its own posterior.
  _, other = _autoencoder(seed=1)
  caplog.clear()
  rebuilt = latent_cache.open_or_build(stage_dir, codec, other, source, d, mesh, batch_size=16)
  assert "stale: the autoencoder's parameters" in caplog.text
  batch = latent_cache.CachedBatches(rebuilt, global_batch=8, seed=3, random_flip=True).get(0)
  np.testing.assert_allclose(batch["image"], moments(other, stream.get(0)["image"]),
                             rtol=1e-5, atol=1e-5)
  # Other preprocessing: rebuilt without the mirrored variant.
  caplog.clear()
  plain = latent_cache.open_or_build(stage_dir, codec, other, source,
                                     _data_cfg(folder, random_flip=False), mesh, batch_size=16)
  assert "data.random_flip (True -> False)" in caplog.text
  assert plain.moments.shape[1] == 1
  assert not os.path.exists(os.path.join(stage_dir, "latent_cache.partial"))


def test_decide_says_why_not(tmp_path):
  config = ldm_configs.get_config("default")
  block = config.ldm
  ae, _ = _autoencoder()
  codec = LatentCodec(ae, 1.0, 32)
  source = list(range(1000))  # only its length is read
  assert latent_cache.decide(block, codec, source, config.data, "ldm")[0]
  block.train.num_steps = 10  # 640 examples read, fewer than the 1000 records
  assert "fewer than the 1000 records" in latent_cache.decide(block, codec, source,
                                                              config.data, "ldm")[1]
  block.train.num_steps = 2000
  block.train.latent_cache_max_gib = 1e-4
  assert "latent_cache_max_gib" in latent_cache.decide(block, codec, source, config.data,
                                                       "ldm")[1]
  block.train.latent_cache_max_gib = 4.0
  config.data.random_crop = True
  assert "random_crop" in latent_cache.decide(block, codec, source, config.data, "ldm")[1]
  config.data.random_crop = False
  block.train.cache_latents = False
  assert "cache_latents=False" in latent_cache.decide(block, codec, source, config.data,
                                                      "ldm")[1]


def _stage_config(folder):
  config = ldm_configs.get_config("smoke")
  config.data.update(source="folder", folder=str(folder), random_flip=True, num_threads=2)
  config.autoencoder.update(ch=8, num_groups=8, mid_attention=False)
  block = config.ldm
  block.unet.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    attention_levels=(), mid_attention=False, num_groups=8)
  block.diffusion.latent_scale = 0.5
  block.optim.warmup_steps = 1
  block.train.update(batch_size=8, num_steps=4, log_every=1, checkpoint_every=2,
                     eval_every=4, keep_checkpoints=3, async_checkpoint=False)
  block.sample.update(steps=1, num_samples=8)
  return config


def _workdir(path, ae_params):
  ckpt = Checkpointer(str(path / "autoencoder" / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": {"autoencoder": ae_params}}, {}, force=True)
  ckpt.close()
  return path


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(workdir / "ldm" / "metrics.jsonl")
          if "loss" in r}


def test_cached_stage_resumes_exactly_and_rebuilds_a_lost_cache(tmp_path, caplog, capfd):
  caplog.set_level(logging.INFO)
  folder = _folder(tmp_path / "images")
  _, ae_params = _autoencoder()
  mesh = sharding.make_mesh(ldm_configs.get_config("smoke").mesh)
  workdir = _workdir(tmp_path / "run", ae_params)
  run_diffusion(_stage_config(folder), "ldm", str(workdir), mesh)
  assert (workdir / "ldm" / "latent_cache" / "moments.npy").exists()
  assert "latent cache of 24 records" in caplog.text
  first = _losses(workdir)
  assert sorted(first) == [1, 2, 3, 4]

  # Interrupted after step 2 (its checkpoint kept, step 4's lost) and the cache lost too:
  # the resumed run rebuilds the cache and trains steps 3 and 4 with the same losses.
  shutil.rmtree(workdir / "ldm" / "checkpoints" / "4")
  shutil.rmtree(workdir / "ldm" / "latent_cache")
  caplog.clear()
  capfd.readouterr()
  run_diffusion(_stage_config(folder), "ldm", str(workdir), mesh)
  assert "latent cache: building" in caplog.text
  assert "at step 2" in capfd.readouterr().err
  resumed = _losses(workdir)
  for step in (3, 4):
    assert resumed[step] == first[step], (step, resumed[step], first[step])
