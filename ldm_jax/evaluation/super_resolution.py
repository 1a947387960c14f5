"""A super-resolution stage against bicubic upsampling, on real images: the sanity check every
cascade stage must pass before it is compared with anything (SR3, CDM and Imagen all report
their SR models against it).

The real high-resolution image is shrunk to the stage's conditioning resolution exactly as
training shrinks x_0 (`codecs.resize`: antialiased triangle filter); the stage upsamples it
with its own sampling settings, bicubic upsampling (Keys, a = -0.5, as PIL's) is the trivial
method. Both are scored against the real image: PSNR per image (on [0, 1]), averaged, and,
given a judge, class accuracy with every image brought to the judge's resolution by the same
bicubic resize (the real image's accuracy there is the ceiling).
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import codecs
from ldm_jax.evaluation import metrics


def bicubic(images, size: int) -> np.ndarray:
  """NHWC float images in [-1, 1] to size x size, bicubic, clipped to [-1, 1]."""
  x = jnp.asarray(images, jnp.float32)
  if x.shape[1] == size:
    return np.asarray(x)
  out = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "cubic")
  return np.asarray(jnp.clip(out, -1.0, 1.0))


def psnr_per_image(x, y) -> np.ndarray:
  """PSNR in dB of images in [-1, 1] (as [0, 1]), one value per image."""
  return np.asarray(metrics.psnr(metrics.to_unit(jnp.asarray(x)),
                                 metrics.to_unit(jnp.asarray(y))))


def sr_vs_bicubic(upsample: Callable[[np.ndarray, np.ndarray], np.ndarray], images: np.ndarray,
                  labels: np.ndarray, resolution: int, low_resolution: int, *,
                  batch_size: int = 250,
                  predict: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                  judge_resolution: int = 0) -> dict:
  """Scores `upsample(lowres [b, l, l, C], labels [b]) -> [b, r, r, C]` (a stage's sampler)
  against bicubic upsampling on real `images` (NHWC in [-1, 1], any size >= resolution).

  Returns psnr_sr, psnr_bicubic (mean dB), psnr_gain (their difference), num_images, and with
  `predict` (a judge of images at `judge_resolution`) accuracy_sr, accuracy_bicubic and
  accuracy_real (the real image at `resolution`, brought to the judge's size the same way).
  """
  hr_all, sr_all, bic_all = [], [], []
  for i in range(0, len(images), batch_size):
    hr = np.asarray(codecs.resize(jnp.asarray(images[i:i + batch_size], jnp.float32),
                                  resolution))
    low = np.asarray(codecs.resize(jnp.asarray(hr), low_resolution))
    sr = np.asarray(upsample(low, np.asarray(labels[i:i + batch_size])), np.float32)
    if sr.shape != hr.shape:
      raise ValueError(f"the stage returned {sr.shape} for {hr.shape} images")
    hr_all.append(hr)
    sr_all.append(sr)
    bic_all.append(bicubic(low, resolution))
  hr, sr, bic = (np.concatenate(a) for a in (hr_all, sr_all, bic_all))
  p_sr, p_bic = psnr_per_image(sr, hr), psnr_per_image(bic, hr)
  out = {"psnr_sr": float(np.mean(p_sr)), "psnr_bicubic": float(np.mean(p_bic)),
         "num_images": int(len(hr))}
  out["psnr_gain"] = out["psnr_sr"] - out["psnr_bicubic"]
  if predict is not None:
    size = judge_resolution or resolution
    labels = np.asarray(labels[:len(hr)])
    for name, x in (("sr", sr), ("bicubic", bic), ("real", hr)):
      out[f"accuracy_{name}"] = float(np.mean(np.asarray(predict(bicubic(x, size))) == labels))
  return out


def stage_vs_bicubic(stage, images: np.ndarray, labels: np.ndarray, low_resolution: int, *,
                     settings: dict, seed: int = 0, batch_size: int = 250,
                     predict: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                     judge_resolution: int = 0) -> dict:
  """`sr_vs_bicubic` of a super-resolution stage (a DiffusionPipeline) sampled with
  `settings` (its sample keywords) at augmentation level 0: a real downsampled image has none
  of the base-stage artifacts that sampling augmentation is there to hide."""
  kw = {**settings, "aug_level": 0.0}

  def upsample(low, lab):
    cond = {"labels": lab} if stage.model.cond_kind == "class" else {}
    return stage.sample(len(low), seed=seed, lowres=low, as_uint8=False, **kw, **cond)

  return sr_vs_bicubic(upsample, images, labels, stage.latent_shape[0], low_resolution,
                       batch_size=min(batch_size, len(images)), predict=predict,
                       judge_resolution=judge_resolution)


def describe(result: dict) -> str:
  """One line: the stage's PSNR against bicubic (and accuracies when judged)."""
  line = (f"SR {result['psnr_sr']:.2f} dB vs bicubic {result['psnr_bicubic']:.2f} dB "
          f"({result['psnr_gain']:+.2f}) on {result['num_images']} held-out images")
  if "accuracy_sr" in result:
    line += (f", class accuracy {result['accuracy_sr']:.3f} vs bicubic "
             f"{result['accuracy_bicubic']:.3f} (real {result['accuracy_real']:.3f})")
  return line
