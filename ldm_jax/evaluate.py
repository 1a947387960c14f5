"""Evaluate a trained workdir (LDM, pixel-space model or cascade):

  python -m ldm_jax.evaluate --workdir=runs/ldm --num_samples=10000 \\
      [--inception=inception_fid.npz] [--save_samples]

writes <workdir>/eval_<step>.json: FID / KID on Inception-v3 features (with --inception, the
FID weights converted by `python -m ldm_jax.convert.inception`), class accuracy and a Frechet
distance on the project's classifier (trained once, cached), and for LDM workdirs PSNR / SSIM
/ rFID of the autoencoder on the test split. Same flags, same numbers. See
docs/BENCHMARKS.md ("Evaluation").
"""
from ldm_jax import console  # quiet TensorFlow before anything imports it

console.quiet_environment()

from absl import app  # noqa: E402

from ldm_jax.cli import evaluate  # noqa: E402  (defines the flags)

if __name__ == "__main__":
  app.run(evaluate.main)
