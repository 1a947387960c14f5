"""Sample from a trained workdir (LDM, pixel-space model or cascade):

  python sample.py --workdir=runs/ldm --num_samples=64 --sampler=ddim --steps=50 \
      --guidance=3.0 --seed=0 --out=grid.png
  python sample.py --workdir=runs/ldm --label=7 --trajectory --out=traj.png
  python sample.py --workdir=runs/cascade --num_samples=64 --steps=50 --guidance=3 --out=c.png
      (a cascade samples through all its stages; --aug_level sets the super-resolution
      stages' conditioning augmentation)
  python sample.py --workdir=runs/sd15 --prompt "an astronaut riding a horse" --guidance=7.5
      (a workdir converted by `python -m ldm_jax.convert`, see docs/STABLE_DIFFUSION.md)
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained workdir: LDM, pixel-space model or cascade "
                    "(train.py --config=configs/{ldm,pixel,cascade}.py), or a converted one.")
flags.DEFINE_integer("num_samples", 16, "Number of images.")
flags.DEFINE_enum("sampler", "ddim", ["ddpm", "ddim", "dpmpp_2m"], "Reverse-process sampler.")
flags.DEFINE_integer("steps", 50, "Sampler steps.")
flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance scale (1 = conditional only).")
flags.DEFINE_float("eta", 0.0, "DDIM stochasticity.")
flags.DEFINE_integer("seed", 0, "Random seed: same seed, same images.")
flags.DEFINE_integer("label", None, "Class label for every sample (class-conditional models).")
flags.DEFINE_string("prompt", None, "Text prompt (text-conditional models).")
flags.DEFINE_boolean("trajectory", False, "Write the decoded z_T ... z_0 of each sample instead.")
flags.DEFINE_integer("trajectory_frames", 10, "Frames shown per trajectory.")
flags.DEFINE_enum("timestep_spacing", None, ["leading", "linspace", "trailing"],
                  "Timestep spacing (default: the workdir's scheduler settings, else the "
                  "sampler's own default).")
flags.DEFINE_integer("steps_offset", None, "Offset added to 'leading' timesteps (default: the "
                     "workdir's scheduler settings).")
flags.DEFINE_float("aug_level", None, "Cascades: noise level of each super-resolution stage's "
                   "low-resolution input, a fraction of the timesteps in [0, 1) (default: the "
                   "stage's lowres.sample_aug_level).")
flags.DEFINE_string("out", "samples.png", "Output PNG file.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ldm_jax import platform  # noqa: E402
  platform.configure()
  platform.quiet_library_logs()
  from ldm_jax.errors import UserError
  from ldm_jax.evaluation.images import save_png
  from ldm_jax.pipeline import LatentDiffusionPipeline, StepProgress, sample_grid
  try:
    pipe = LatentDiffusionPipeline.from_workdir(FLAGS.workdir)
    grid = sample_grid(
        pipe, FLAGS.num_samples, sampler=FLAGS.sampler, steps=FLAGS.steps,
        guidance=FLAGS.guidance, eta=FLAGS.eta, seed=FLAGS.seed, labels=FLAGS.label,
        prompt=FLAGS.prompt, timestep_spacing=FLAGS.timestep_spacing,
        steps_offset=FLAGS.steps_offset, aug_level=FLAGS.aug_level,
        trajectory_frames=FLAGS.trajectory_frames if FLAGS.trajectory else 0,
        progress=StepProgress(FLAGS.steps))
    save_png(FLAGS.out, grid)
    print(f"wrote {FLAGS.out}")
  except UserError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
