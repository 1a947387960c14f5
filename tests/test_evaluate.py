"""`python -m ldm_jax.evaluate` and the batched sampler it shares with sample.py, on a tiny
LDM workdir with random parameters (no training needed to test the plumbing)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax import platform
from ldm_jax.sampling import batches as sb
from ldm_jax.sampling import sinks
from ldm_jax import workdir as workdir_lib
from ldm_jax.convert.workdir import save_params
from ldm_jax.errors import UserError
from ldm_jax.sampling.load import build_model
from ldm_jax.models.builders import build_autoencoder

ROOT = pathlib.Path(__file__).parents[1]
from configs import ldm as ldm_configs


def tiny_ldm_workdir(workdir, data_dir) -> str:
  """configs/ldm.py:smoke shrunk further (2 levels, no attention), random parameters, saved
  as a parameters-only workdir (the layout `python -m ldm_jax.convert` writes)."""
  config = ldm_configs.get_config("smoke")
  config.data.data_dir = str(data_dir)
  config.autoencoder.update(ch=8, ch_mult=(1, 2), mid_attention=False, num_groups=8)
  config.ldm.unet.update(model_channels=16, channel_mult=(1, 2), attention_levels=(),
                         mid_attention=False, num_groups=8)
  size, channels = config.data.image_size, config.data.channels
  ae = build_autoencoder(config.autoencoder, channels)
  once = platform.run_once_compiler_options()  # init runs once: compile it fast
  ae_params = jax.jit(ae.init, compiler_options=once)(
      jax.random.key(0), np.zeros((1, size, size, channels), np.float32))["params"]
  shape = (size // ae.downsample_factor,) * 2 + (ae.embed_dim,)
  model = build_model(config, "ldm", shape[-1], 10)
  params = jax.jit(model.init, static_argnums=1, compiler_options=once)(jax.random.key(1),
                                                                        shape)
  save_params(workdir_lib.checkpoint_dir(str(workdir), "autoencoder"), ae_params, {})
  save_params(workdir_lib.checkpoint_dir(str(workdir), "ldm"), params,
              {"latent_scale": 1.0, "latent_shape": list(shape), "num_classes": 10,
               "class_names": [f"class{i}" for i in range(10)], "tokenizer": ""})
  workdir_lib.write_config(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def tiny_workdir(tfds_dir, tmp_path_factory):
  return tiny_ldm_workdir(tmp_path_factory.mktemp("tiny_ldm"), tfds_dir)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_workdir):
  from ldm_jax.sampling import from_workdir
  return from_workdir(tiny_workdir)


SAMPLE = dict(sampler="ddim", steps=2, guidance=2.0)


def test_batches_are_restartable_and_independent_of_interruption(tiny_pipe, tmp_path):
  plan = sb.BatchPlan(num_samples=5, batch_size=2, seed=7)  # 3 batches, the last one cut
  settings = sb.settings_of("w", plan, **SAMPLE)
  folder = str(tmp_path / "pngs")
  sb.run_to_sink(tiny_pipe, plan, sinks.PngDirSink(folder, plan, settings), **SAMPLE)
  names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
  assert names == [f"{i:06d}.png" for i in range(5)]
  full = {n: (tmp_path / "pngs" / n).read_bytes() for n in names}
  # Batch 1 lost (images 2, 3): a restart samples only that batch, and the same images.
  for n in ("000002.png", "000003.png"):
    os.remove(os.path.join(folder, n))
  calls = []
  orig = tiny_pipe.sample

  def counting(n, **kw):
    calls.append(kw["seed"])
    return orig(n, **kw)

  tiny_pipe.sample = counting
  try:
    sb.run_to_sink(tiny_pipe, plan, sinks.PngDirSink(folder, plan, settings), **SAMPLE)
  finally:
    del tiny_pipe.sample
  assert calls == [sb.batch_seed(7, 1)]
  assert {n: (tmp_path / "pngs" / n).read_bytes() for n in names} == full
  # Batch 0 is pipe.sample(batch, seed=seed); labels are balanced over the whole run.
  np.testing.assert_array_equal(
      next(sb.sample_batches(tiny_pipe, plan, **SAMPLE))[1],
      tiny_pipe.sample(2, seed=7, labels=[0, 1], **SAMPLE))
  labels = np.concatenate([b[2] for b in sb.sample_batches(
      tiny_pipe, sb.BatchPlan(23, 10, 0), skip=lambda i: False, **SAMPLE)])
  np.testing.assert_array_equal(labels, np.arange(23) % 10)
  # Other settings never mix into the folder.
  with pytest.raises(UserError, match=r"other settings \(seed: 7 there, 8 now\)"):
    sinks.PngDirSink(folder, plan, {**settings, "seed": 8})

  # One .npz: a run interrupted after its first batch, restarted, equals the PNGs above.
  path = str(tmp_path / "s.npz")

  def dying(n, **kw):
    if kw["seed"] != 7:
      raise KeyboardInterrupt
    return orig(n, **kw)

  tiny_pipe.sample = dying
  try:
    with pytest.raises(KeyboardInterrupt):
      sb.run_to_sink(tiny_pipe, plan, sinks.NpzSink(path, plan, settings), **SAMPLE)
  finally:
    del tiny_pipe.sample
  assert sorted(os.listdir(path + ".parts")) == ["batch_000000.npz", "sampling.json"]
  sb.run_to_sink(tiny_pipe, plan, sinks.NpzSink(path, plan, settings), **SAMPLE)
  images, got_labels = sinks.read_samples(path)
  from PIL import Image
  want = np.stack([np.asarray(Image.open(os.path.join(folder, n))) for n in names])
  np.testing.assert_array_equal(images[..., 0], want)
  np.testing.assert_array_equal(got_labels, np.arange(5) % 10)
  assert not os.path.exists(path + ".parts")


def test_default_batch_size_fits_memory(tiny_pipe):
  per = sb.estimated_bytes_per_sample(tiny_pipe)
  assert sb.default_batch_size(tiny_pipe, 100_000, memory_bytes=4 * per * 37) == 37
  assert sb.default_batch_size(tiny_pipe, 100_000, memory_bytes=1) == 1
  assert sb.default_batch_size(tiny_pipe, 10, memory_bytes=1 << 40) == 10
  assert sb.default_batch_size(tiny_pipe, 100_000, memory_bytes=1 << 40) == sb.MAX_DEFAULT_BATCH


def test_progress_line_has_count_rate_and_eta():
  """A batched run reports through console.Progress (the one progress line), counting images
  from where a resumed run starts."""
  import io
  now = [0.0]
  out = io.StringIO()
  p = sb.BatchProgress(out, clock=lambda: now[0])
  plan = sb.BatchPlan(30, 10)
  p.start(plan, done=1)
  now[0] = 10.0
  p.batch_done(1, 10)
  now[0] = 20.0
  p.batch_done(2, 10)
  assert out.getvalue().splitlines() == [
      "sampling: 1 of 3 batches already on disk, resuming",
      "sampling  image 10/30",
      "sampling  image 20/30  1 images/s  ETA 10s",
      "sampling  image 30/30  1 images/s  done"]


def _random_inception_npz(path):
  from ldm_jax.convert.inception import save_npz
  from ldm_jax.models import inception
  variables = jax.jit(inception.InceptionV3().init,
                      compiler_options=platform.run_once_compiler_options())(
      jax.random.key(0), np.zeros((1, 75, 75, 3), np.float32))
  save_npz(str(path), variables)
  return str(path)


def test_evaluate_writes_every_metric_and_same_seed_same_numbers(tiny_workdir, tmp_path,
                                                                  monkeypatch):
  from ldm_jax.evaluation import run
  from ldm_jax.models import inception
  monkeypatch.setattr(inception, "FID_SIZE", 75)  # the smallest input Inception takes: cheap
  weights = _random_inception_npz(tmp_path / "inception.npz")
  opts = dict(num_samples=12, batch_size=5, steps=2, guidance=2.0, inception=weights,
              inception_batch=16, max_test_images=30, judge_epochs=1, judge_train_images=256,
              kid_subsets=4, kid_subset_size=10, cache_dir=str(tmp_path / "cache"))
  logs = []
  first = run.evaluate(tiny_workdir, run.Options(**opts), log=logs.append)
  assert first["path"] == os.path.join(tiny_workdir, "eval_0.json")
  assert json.load(open(first["path"], encoding="utf-8"))["step"] == 0
  assert first["classifier"]["cached"] is False and any("training the classifier" in m
                                                        for m in logs)
  cls, inc, ae = first["classifier"], first["inception"], first["autoencoder"]
  assert 0 <= cls["class_accuracy"] <= 1 and cls["frechet_distance"] > 0
  assert inc["fid"] > 0 and np.isfinite(inc["kid"]) and inc["kid_subset_size"] == 10
  assert ae["num_images"] == 30 and np.isfinite(ae["psnr"]) and -1 <= ae["ssim"] <= 1
  assert ae["rfid"] > 0 and first["reference"]["num_images"] == 30
  # Again, keeping the samples: the cached classifier, and the same numbers.
  second = run.evaluate(tiny_workdir, run.Options(**opts, save_samples=True,
                                                  autoencoder=False), log=logs.append)
  assert second["classifier"].pop("cached") is True and "autoencoder" not in second
  first["classifier"].pop("cached")
  for key in ("classifier", "inception"):
    assert second[key] == first[key], key
  images, labels = sinks.read_samples(os.path.join(tiny_workdir, "eval_0_samples.npz"))
  assert images.shape == (12, 32, 32, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(12) % 10)
  with pytest.raises(UserError, match="num_samples=0"):
    run.evaluate(tiny_workdir, run.Options(num_samples=0))


def test_evaluate_cli_bad_input_is_one_line(tmp_path):
  cmd = [sys.executable, "-m", "ldm_jax.evaluate", f"--workdir={tmp_path / 'none'}"]
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines() == [
      f"error: no trained model in {str(tmp_path / 'none')!r}: looked for "
      f"{tmp_path / 'none' / 'config.json'}"]
