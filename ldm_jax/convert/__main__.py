"""Convert reference weights into an ldm_jax workdir (config.json + orbax checkpoints):

  python -m ldm_jax.convert diffusers <sd folder> <workdir>
  python -m ldm_jax.convert compvis <model.ckpt|.safetensors> <workdir> \\
      --config <compvis yaml or preset> [--tokenizer <folder with vocab.json, merges.txt>]

then `python sample.py --workdir=<workdir> --prompt "..."`. Weights are read without running
pickled code (safetensors, or torch.load(weights_only=True)). See docs/STABLE_DIFFUSION.md.
"""
import argparse
import os
import sys
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m ldm_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="source", required=True)
  d = sub.add_parser("diffusers", help="a diffusers StableDiffusionPipeline folder")
  d.add_argument("folder", help="folder with model_index.json, unet/, vae/, text_encoder/, "
                 "tokenizer/, scheduler/")
  d.add_argument("workdir", help="new ldm_jax workdir to write")
  c = sub.add_parser("compvis", help="a CompVis / Stability single-file checkpoint")
  c.add_argument("checkpoint", help=".ckpt (torch) or .safetensors file")
  c.add_argument("workdir", help="new ldm_jax workdir to write")
  c.add_argument("--config", required=True,
                 help="the model's CompVis yaml (e.g. v1-inference.yaml) or a preset name")
  c.add_argument("--tokenizer", default=None,
                 help="folder with CLIP's vocab.json and merges.txt (CompVis checkpoints do "
                 "not include the tokenizer)")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from ldm_jax.convert import stable_diffusion  # pylint: disable=g-import-not-at-top
  from ldm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    if args.source == "diffusers":
      stable_diffusion.convert_diffusers(args.folder, args.workdir)
    else:
      stable_diffusion.convert_compvis(args.checkpoint, args.workdir, args.config,
                                       args.tokenizer)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {os.path.abspath(args.workdir)}; sample with:\n  python sample.py "
        f"--workdir={args.workdir} --prompt \"a photograph of an astronaut riding a horse\" "
        "--guidance=7.5 --steps=50 --num_samples=4")
  return 0


if __name__ == "__main__":
  sys.exit(main())
