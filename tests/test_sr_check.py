"""The super-resolution sanity check (ldm_jax.evaluation.super_resolution): bicubic against
itself gains nothing, an oracle that returns the real image wins, a blurrier method loses,
and the judge's accuracies are computed on the same images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import codecs
from ldm_jax.evaluation import super_resolution as srl


def _images(n=12, size=32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (n, size // 4, size // 4, 1)).astype(np.float32)
  return np.asarray(jax.image.resize(jnp.asarray(x), (n, size, size, 1), "cubic")).clip(-1, 1)


def test_bicubic_against_itself_gains_nothing_and_an_oracle_wins():
  images, labels = _images(), np.arange(12) % 3
  same = srl.sr_vs_bicubic(lambda low, lab: srl.bicubic(low, 16), images, labels, 16, 8,
                           batch_size=5)
  assert same["num_images"] == 12 and abs(same["psnr_gain"]) < 1e-5
  hr = np.asarray(codecs.resize(jnp.asarray(images), 16))
  calls = []

  def oracle(low, lab):
    calls.append(len(low))
    i = sum(calls) - len(low)
    return hr[i:i + len(low)]

  best = srl.sr_vs_bicubic(oracle, images, labels, 16, 8, batch_size=5)
  assert calls == [5, 5, 2] and best["psnr_sr"] > 60 and best["psnr_gain"] > 20
  blurry = srl.sr_vs_bicubic(lambda low, lab: np.zeros((len(low), 16, 16, 1), np.float32),
                             images, labels, 16, 8)
  assert blurry["psnr_gain"] < 0
  with pytest.raises(ValueError, match="returned"):
    srl.sr_vs_bicubic(lambda low, lab: low, images, labels, 16, 8)


def test_judged_accuracies_and_the_line():
  images, labels = _images(), np.arange(12) % 2
  seen = []

  def predict(x):
    seen.append(x.shape)
    return (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64)

  r = srl.sr_vs_bicubic(lambda low, lab: srl.bicubic(low, 16), images, labels, 16, 8,
                        predict=predict, judge_resolution=32)
  assert seen == [(12, 32, 32, 1)] * 3  # every image brought to the judge's size
  assert r["accuracy_sr"] == r["accuracy_bicubic"] and 0 <= r["accuracy_real"] <= 1
  line = srl.describe(r)
  assert "vs bicubic" in line and "class accuracy" in line and "12 held-out" in line
