"""`python -m ldm_jax.evaluate`: the numbers of a trained workdir, written to
`<workdir>/eval_<step>.json` (step: the last stage's checkpoint).

  samples       N images drawn in batches (sampling.batches: batch i from (seed, i); class
                models get balanced labels), optionally kept in eval_<step>_samples.npz
  inception     FID and KID (Inception-v3 pool3, the pytorch-fid / TF FID network) of the
                samples against the data's test split; needs the weights file (--inception)
  classifier    class accuracy of the samples and the Frechet distance of their features to
                the test split's, on the project's small classifier (trained on the
                training split once, then read from the cache)
  autoencoder   LDM workdirs: PSNR / SSIM of posterior-mode reconstructions of the test split
                and their rFID (Inception) and Frechet distance on classifier features

Everything random is seeded (sampling by --seed, the classifier by its own seed, KID subsets
by --seed): the same command gives the same numbers.
"""
import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import files
from ldm_jax.sampling import settings as stage_settings
from ldm_jax.sampling import batches as sb
from ldm_jax.sampling import sinks
from ldm_jax import workdir as workdir_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.errors import UserError
from ldm_jax.evaluation import cache, classifier, metrics, super_resolution
from ldm_jax.images import to_uint8
from ldm_jax.evaluation.inception_features import InceptionFeatures, to_float
from ldm_jax.sampling import from_workdir


@dataclasses.dataclass
class Options:
  num_samples: int = 10_000
  batch_size: Optional[int] = None
  seed: int = 0
  # Per stage (ldm_jax.sampling.settings): a value, a list / comma string with one per stage,
  # or None for each stage's own config.<stage>.sample.
  sampler: Any = None
  steps: Any = None
  guidance: Any = None
  eta: Any = None
  thresholding: Any = None
  aug_level: Any = None
  sr_images: int = 500                 # cascades: images of the SR-vs-bicubic check (0: skip)
  step: Optional[int] = None           # the last stage's checkpoint (None: the newest)
  inception: Optional[str] = None      # FID weights (.npz from ldm_jax.convert.inception, .pth)
  inception_batch: int = 50
  save_samples: bool = False
  max_test_images: int = 0             # 0: the whole test split
  judge_epochs: int = 2
  judge_train_images: int = 0          # 0: the whole training split
  judge_seed: int = 0
  kid_subsets: int = 100
  kid_subset_size: int = 1000
  autoencoder: bool = True
  cache_dir: Optional[str] = None
  data_dir: Optional[str] = None

  def per_stage(self) -> dict:
    return stage_settings.parse_all(**{k: getattr(self, k) for k in stage_settings.PARSERS})

  def check(self) -> None:
    self.per_stage()  # one line for a bad per-stage value
    if self.sr_images < 0:
      raise UserError(f"--sr_images={self.sr_images} must be 0 (skip) or positive")
    positive = ("num_samples", "inception_batch", "judge_epochs", "kid_subsets")
    for name in positive:
      if getattr(self, name) < 1:
        raise UserError(f"--{name}={getattr(self, name)} must be at least 1")
    for name in ("batch_size", "step"):
      value = getattr(self, name)
      if value is not None and value < (1 if name == "batch_size" else 0):
        raise UserError(f"--{name}={value} is out of range")
    for name in ("max_test_images", "judge_train_images"):
      if getattr(self, name) < 0:
        raise UserError(f"--{name}={getattr(self, name)} must be 0 (all) or positive")
    if self.kid_subset_size < 2:
      raise UserError(f"--kid_subset_size={self.kid_subset_size} must be at least 2")
    if not 0 <= self.seed < 2**32:
      raise UserError(f"--seed={self.seed} must be in [0, 2^32)")


def last_step(workdir: str, stage: str) -> int:
  """The newest checkpoint step of a stage (what sampling loads by default)."""
  directory = workdir_lib.checkpoint_dir(workdir, stage)
  if not os.path.isdir(directory):
    raise UserError(f"no {stage} checkpoint in {workdir!r}: looked for {directory}/<step>")
  ckpt = Checkpointer(os.path.abspath(directory), read_only=True)
  try:
    steps = ckpt.all_steps()
  finally:
    ckpt.close()
  if not steps:
    raise UserError(f"no {stage} checkpoint in {workdir!r}: looked for {directory}/<step>")
  return int(max(steps))


def cached_judge(data_cfg, opts: Options, log) -> tuple[classifier.Judge, bool]:
  """The classifier of this data set, trained once per cache folder."""
  ident = cache.data_identity(data_cfg)
  name = "judge_" + cache.key(data=ident, epochs=opts.judge_epochs, seed=opts.judge_seed,
                              train_images=opts.judge_train_images) + ".npz"
  path = cache.path_in(opts.cache_dir, name)
  if not os.path.exists(path):
    log(f"training the classifier (once; cached as {path}) ...")
  test_x, test_y = classifier.test_split(data_cfg, opts.max_test_images)

  def train():
    j = classifier.train_judge(data_cfg, epochs=opts.judge_epochs, seed=opts.judge_seed,
                               max_train_images=opts.judge_train_images, max_test_images=1)
    return {"params": j.params}

  tree, reused = cache.cached_tree(path, train)
  params = jax.tree.map(jnp.asarray, tree["params"])
  return classifier.judge_from_params(params, classifier.num_classes_of(params), test_x,
                                      test_y), reused


def _inception_reference(features: InceptionFeatures, data_cfg, images, opts: Options,
                         progress) -> tuple[np.ndarray, bool]:
  name = "inception_ref_" + cache.key(data=cache.data_identity(data_cfg),
                                      weights=cache.file_digest(features.path),
                                      images=len(images)) + ".npz"
  return cache.cached_array(cache.path_in(opts.cache_dir, name),
                            lambda: features(to_uint8(images), progress("inception, test")))


def draw_samples(workdir: str, pipe, opts: Options, step: int, log) -> tuple:
  """(uint8 images, labels or None, seconds, batch size) of the evaluation's samples."""
  batch = opts.batch_size or sb.default_batch_size(pipe, opts.num_samples)
  plan = sb.BatchPlan(opts.num_samples, batch, opts.seed)
  kwargs = stage_settings.sample_kwargs(pipe, opts.per_stage())
  progress = sb.BatchProgress(what="sampling")
  log(f"drawing {opts.num_samples} samples ({plan.num_batches} batches of {batch}, "
      f"{kwargs['sampler']}-{kwargs['steps']}, guidance {kwargs['guidance']}) ...")
  start = time.time()
  if opts.save_samples:
    path = os.path.join(workdir, f"eval_{step}_samples.npz")
    sink = sinks.NpzSink(path, plan, sb.settings_of(workdir, plan, step=step, **kwargs))
    sb.run_to_sink(pipe, plan, sink, batch_progress=progress, **kwargs)
    images, labels = sinks.read_samples(path)
  else:
    parts = list(sb.sample_batches(pipe, plan, batch_progress=progress, **kwargs))
    images = np.concatenate([p[1] for p in parts])
    labels = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
  return images, labels, time.time() - start, batch, kwargs


def _reconstructions(pipe, test_x: np.ndarray, batch: int = 250) -> np.ndarray:
  """Posterior-mode reconstructions of images in [-1, 1], clipped to [-1, 1] (float32)."""
  codec, params = pipe.codec, pipe.codec_params
  fn = jax.jit(lambda p, x: jnp.clip(codec.decode(p, codec.encode(p, x)), -1.0, 1.0))
  out = []
  for i in range(0, len(test_x), batch):
    chunk = test_x[i:i + batch]
    pad = batch - len(chunk) if len(test_x) > batch else 0
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(params, chunk))[:batch - pad])
  return np.concatenate(out)


def _psnr_ssim(x: np.ndarray, y: np.ndarray, batch: int = 500) -> tuple[float, float]:
  """Mean PSNR and SSIM of two image sets in [-1, 1] (measured on [0, 1])."""
  fn = jax.jit(lambda a, b: (metrics.psnr(metrics.to_unit(a), metrics.to_unit(b)),
                             metrics.ssim(metrics.to_unit(a), metrics.to_unit(b))))
  psnr, ssim = [], []
  for i in range(0, len(x), batch):
    p, s = fn(x[i:i + batch], y[i:i + batch])
    psnr.append(np.asarray(p))
    ssim.append(np.asarray(s))
  return float(np.concatenate(psnr).mean()), float(np.concatenate(ssim).mean())


def _super_resolution(pipe, sample_kw: dict, judge: classifier.Judge, opts: Options,
                      log) -> dict:
  """Each super-resolution stage of a cascade on the real downsampled test images against
  bicubic upsampling (PSNR, class accuracy with the judge), with the stage's settings of this
  evaluation (`sample_kw`: per-stage lists) at augmentation level 0."""
  n = min(opts.sr_images, len(judge.test_images))
  images, labels = judge.test_images[:n], judge.test_labels[:n]
  out = {}
  for i, stage in enumerate(pipe.stages[1:], start=1):
    kw = {**{k: v[i] for k, v in sample_kw.items()}, "aug_level": 0.0}
    r = super_resolution.stage_vs_bicubic(stage, images, labels,
                                          pipe.stages[i - 1].latent_shape[0], settings=kw,
                                          seed=opts.seed, predict=judge.predict,
                                          judge_resolution=judge.test_images.shape[1])
    r["settings"] = stage_settings.recorded(stage, kw)
    log(f"{stage.name}: {super_resolution.describe(r)}")
    out[stage.name] = r
  return out


def evaluate(workdir: str, opts: Options, log: Callable[[str], None] = print) -> dict:
  """Runs every metric that applies to the workdir; writes and returns eval_<step>.json."""
  opts.check()
  config = workdir_lib.read_config(workdir)
  kind = workdir_lib.kind(config)
  stages = workdir_lib.diffusion_stages(config)
  if not stages:
    raise UserError(f"{workdir} is an autoencoder-only run: evaluation samples a diffusion run")
  if "data" not in config:
    raise UserError(f"{workdir}/config.json has no `data` block: evaluation compares samples "
                    "with a data set's test split")
  data_cfg = config.data
  if opts.data_dir:
    data_cfg.data_dir = opts.data_dir
  step = last_step(workdir, stages[-1]) if opts.step is None else int(opts.step)
  progress = lambda what: sb.BatchProgress(what=what)  # noqa: E731
  t0 = time.time()
  pipe = from_workdir(workdir, step)
  images, labels, sample_s, batch, sample_kw = draw_samples(workdir, pipe, opts, step, log)
  used = stage_settings.recorded(pipe, sample_kw)
  log(f"sampled {len(images)} images in {sample_s:.0f} s; loading the test split ...")
  judge, judge_reused = cached_judge(data_cfg, opts, log)
  test_x = judge.test_images
  samples_f = to_float(images)
  result = {
      "workdir": os.path.abspath(workdir), "kind": kind, "stage": stages[-1], "step": step,
      "num_samples": int(len(images)), "seed": opts.seed, **used, "batch_size": batch,
      "labels": "balanced (index % classes)" if labels is not None else None,
      "reference": {"split": data_cfg.eval_split, "num_images": int(len(test_x))},
  }
  judge_feats_test = judge.features(test_x)
  judge_feats = judge.features(samples_f)
  cls = {"classifier_test_accuracy": judge.test_accuracy,
         "frechet_distance": metrics.frechet_distance(judge_feats, judge_feats_test),
         "cached": judge_reused, "epochs": opts.judge_epochs}
  if labels is not None:
    cls["class_accuracy"] = float((judge.predict(samples_f) == labels).mean())
  result["classifier"] = cls
  features = None
  if opts.inception:
    features = InceptionFeatures(opts.inception, opts.inception_batch)
    ref, _ = _inception_reference(features, data_cfg, test_x, opts, progress)
    sam = features(images, progress("inception, samples"))
    kid_mean, kid_std = metrics.kernel_inception_distance(
        sam, ref, num_subsets=opts.kid_subsets, subset_size=opts.kid_subset_size,
        seed=opts.seed)
    result["inception"] = {"fid": metrics.frechet_distance(sam, ref), "kid": kid_mean,
                           "kid_std": kid_std, "kid_subsets": opts.kid_subsets,
                           "kid_subset_size": min(opts.kid_subset_size, len(sam), len(ref)),
                           "weights": os.path.abspath(opts.inception),
                           "fid_variant": features.fid_variant}
  else:
    result["inception"] = None
    log("no --inception weights: FID / KID skipped (see docs/BENCHMARKS.md, 'Evaluation')")
  if opts.autoencoder and getattr(pipe, "autoencoder", None) is not None:
    log(f"reconstructing {len(test_x)} test images ...")
    recon_float = _reconstructions(pipe, test_x)
    psnr, ssim = _psnr_ssim(recon_float, test_x)  # as the trainer's test metrics: on floats
    recon = to_float(to_uint8(recon_float))  # features of the images as files hold them
    ae = {"psnr": psnr, "ssim": ssim, "num_images": int(len(test_x)),
          "frechet_distance": metrics.frechet_distance(judge.features(recon), judge_feats_test)}
    if features is not None:
      ref, _ = _inception_reference(features, data_cfg, test_x, opts, progress)
      ae["rfid"] = metrics.frechet_distance(features(to_uint8(recon)), ref)
    result["autoencoder"] = ae
  if opts.sr_images and getattr(pipe, "stages", None):
    result["super_resolution"] = _super_resolution(pipe, sample_kw, judge, opts, log)
  result["seconds"] = {"sampling": sample_s, "total": time.time() - t0}
  result["machine"] = {"backend": jax.default_backend(), "devices": jax.device_count()}
  path = os.path.join(workdir, f"eval_{step}.json")
  with files.replaced(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, sort_keys=True)
  result["path"] = path
  return result
