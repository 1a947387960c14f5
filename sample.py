"""Sample from a trained workdir (LDM, pixel-space model or cascade):

  python sample.py --workdir=runs/ldm --num_samples=64 --sampler=ddim --steps=50 \
      --guidance=3.0 --seed=0 --out=grid.png
  python sample.py --workdir=runs/ldm --label=7 --trajectory --out=traj.png
  python sample.py --workdir=runs/cascade --num_samples=64 --steps=50 --guidance=3 --out=c.png
      (a cascade samples through all its stages; --aug_level sets the super-resolution
      stages' conditioning augmentation)
  python sample.py --workdir=runs/sd15 --prompt "an astronaut riding a horse" --guidance=7.5
      (a workdir converted by `python -m ldm_jax.convert`, see docs/STABLE_DIFFUSION.md)
  python sample.py --workdir=runs/sd15 --prompt "a watercolor fox" --negative_prompt "blurry" \
      --init_image=fox.png --strength=0.6 [--mask=mask.png] --out=edit.png
      (image-to-image; with a mask, inpainting: white = repaint; class models take --label)
  python sample.py --workdir=runs/sd15 --prompts_file=prompts.txt --num_samples=4 --out=rows.png
      (a row of --num_samples images per line of the file; --per_prompt_files: a file each)
"""
from ldm_jax import console  # quiet TensorFlow before anything imports it

console.quiet_environment()

from absl import app  # noqa: E402

from ldm_jax.cli import sample  # noqa: E402  (defines the flags)

if __name__ == "__main__":
  app.run(sample.main)
