"""The evaluate command's flags and work (`python -m ldm_jax.evaluate --help`); the work itself
is `ldm_jax.evaluation.run`."""

import sys

from absl import flags

from ldm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained workdir (LDM, pixel-space model or cascade).")
flags.DEFINE_integer("num_samples", 10_000, "Samples to draw (class models: balanced labels).")
flags.DEFINE_integer("batch_size", None, "Images per sampling batch (default: sized to the "
                     "device's memory, at most 256).")
flags.DEFINE_integer("seed", 0, "Seed of the samples and of the KID subsets.")
# Per-stage settings (as sample.py): one value, or a comma list with one per stage; absent:
# each stage's own config.<stage>.sample.
flags.DEFINE_list("sampler", None, "Reverse-process sampler (ddpm, ddim, dpmpp_2m).")
flags.DEFINE_list("steps", None, "Sampler steps, e.g. 50 or 50,20,20.")
flags.DEFINE_list("guidance", None, "Classifier-free guidance scale, e.g. 3 or 3,1,1.")
flags.DEFINE_list("eta", None, "DDIM stochasticity.")
flags.DEFINE_list("thresholding", None, "x_0 thresholding per step: none, static, dynamic.")
flags.DEFINE_list("aug_level", None, "Cascades: the super-resolution stages' augmentation "
                  "level (fraction of the timesteps), one value or one per SR stage.")
flags.DEFINE_integer("sr_images", 500, "Cascades: held-out images on which each "
                     "super-resolution stage is scored against bicubic upsampling (0: skip).")
flags.DEFINE_integer("step", None, "Checkpoint step of the last stage (default: the newest).")
flags.DEFINE_string("inception", None, "FID Inception-v3 weights: the .npz of `python -m "
                    "ldm_jax.convert.inception`, or pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth. Without it FID / KID are skipped.")
flags.DEFINE_integer("inception_batch", 50, "Images per Inception batch.")
flags.DEFINE_boolean("save_samples", False, "Keep the samples in <workdir>/eval_<step>_"
                     "samples.npz (a restarted run then skips the batches already drawn).")
flags.DEFINE_integer("max_test_images", 0, "Reference images from the test split (0: all).")
flags.DEFINE_integer("judge_epochs", 2, "Training epochs of the classifier.")
flags.DEFINE_integer("judge_train_images", 0, "Training images of the classifier (0: all).")
flags.DEFINE_integer("kid_subsets", 100, "KID: number of random subsets.")
flags.DEFINE_integer("kid_subset_size", 1000, "KID: images per subset (at most all).")
flags.DEFINE_boolean("autoencoder", True, "LDM workdirs: also PSNR / SSIM / rFID of the "
                     "autoencoder on the test split.")
flags.DEFINE_string("cache_dir", None, "Where the classifier and reference features are "
                    "cached (default: $LDM_JAX_CACHE, else ~/.cache/ldm_jax).")
flags.DEFINE_string("data_dir", None, "Override the workdir's config.data.data_dir.")
flags.mark_flags_as_required(["workdir"])

_OPTION_FLAGS = ("num_samples", "batch_size", "seed", "sampler", "steps", "guidance", "eta",
                 "thresholding", "aug_level", "sr_images", "step", "inception", "inception_batch", "save_samples", "max_test_images",
                 "judge_epochs", "judge_train_images", "kid_subsets", "kid_subset_size",
                 "autoencoder", "cache_dir", "data_dir")


def _summary(result: dict) -> str:
  parts = []
  inc = result.get("inception")
  if inc:
    parts.append(f"FID {inc['fid']:.2f}  KID {inc['kid']:.4f} +- {inc['kid_std']:.4f}")
  cls = result["classifier"]
  if "class_accuracy" in cls:
    parts.append(f"class accuracy {cls['class_accuracy']:.3f}")
  parts.append(f"classifier FD {cls['frechet_distance']:.2f}")
  for name, sr in (result.get("super_resolution") or {}).items():
    parts.append(f"{name}: SR {sr['psnr_sr']:.2f} dB vs bicubic {sr['psnr_bicubic']:.2f} dB, "
                 f"accuracy {sr['accuracy_sr']:.3f} vs {sr['accuracy_bicubic']:.3f}")
  ae = result.get("autoencoder")
  if ae:
    rfid = f"  rFID {ae['rfid']:.2f}" if "rfid" in ae else ""
    parts.append(f"autoencoder PSNR {ae['psnr']:.2f} dB  SSIM {ae['ssim']:.4f}{rfid}")
  return " | ".join(parts)


def main(argv):
  cli.start(argv, FLAGS.verbosity)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)  # TFDS / XLA start-up INFO lines
  from ldm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from ldm_jax.evaluation import run  # pylint: disable=g-import-not-at-top
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  try:
    opts = run.Options(**{name: getattr(FLAGS, name) for name in _OPTION_FLAGS})
    result = run.evaluate(FLAGS.workdir, opts, log=log)
  except UserError as e:
    sys.exit(f"error: {e}")
  print(_summary(result))
  print(f"wrote {result['path']}")

