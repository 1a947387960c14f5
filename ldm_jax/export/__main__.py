"""python -m ldm_jax.export --workdir=W --out=DIR [--step=N]: a workdir as a diffusers folder
(see ldm_jax/export/__init__.py)."""
import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m ldm_jax.export", description=__doc__)
  p.add_argument("--workdir", required=True, help="a trained or converted LDM workdir")
  p.add_argument("--out", required=True, help="the diffusers folder to write (must not exist)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--format", choices=("diffusers", "single_file"), default="diffusers",
                 help="a diffusers folder, or the CompVis single-file checkpoint (--out ends "
                 "in .safetensors; its yaml is written beside it)")
  p.add_argument("--lora_only", action="store_true", help="a LoRA run: write its adapters "
                 "alone, as diffusers' pytorch_lora_weights.safetensors")
  args = p.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from ldm_jax import platform  # pylint: disable=g-import-not-at-top
  platform.configure()
  platform.quiet_library_logs()
  from ldm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from ldm_jax.export import (export_diffusers, export_lora,  # pylint: disable=g-import-not-at-top
                              export_single_file)
  fn = (export_lora if args.lora_only else
        export_single_file if args.format == "single_file" else export_diffusers)
  try:
    kind = fn(args.workdir, args.out, args.step)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {os.path.abspath(args.out)} ({kind})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
