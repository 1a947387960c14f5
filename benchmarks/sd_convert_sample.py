"""Wall time to convert a full-size Stable Diffusion 1.x diffusers folder and sample one
512x512 image from it (issue 4's closing figure).

No weights can be downloaded here, so the folder is a randomly initialised SD 1.x pipeline of
the published shapes (UNet2DConditionModel 860M, AutoencoderKL 84M, CLIP ViT-L/14 text model
123M) with a small BPE tokenizer vocabulary; the timings do not depend on the weight values.

  .venv/bin/python -m benchmarks.sd_convert_sample --dir=/tmp/sd_bench --steps=20

prints: the time to write the folder (diffusers, not ours), `python -m ldm_jax.convert
diffusers` wall time, and `sample.py` wall time (process start to PNG, compile included) for
one 512x512 image with DDIM and classifier-free guidance.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_sd15_folder(folder: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  tok = reference.write_tokenizer(os.path.join(folder, "_tok"))
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(  # SD 1.x: CLIP ViT-L/14
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id))
  unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768,
                                        attention_head_dim=8)  # SD 1.x defaults otherwise
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
      block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
      up_block_types=("UpDecoderBlock2D",) * 4)
  reference.save_sd_folder(folder, os.path.join(folder, "_tok"), tok, text, unet, vae)
  shutil.rmtree(os.path.join(folder, "_tok"))
  n = sum(p.numel() for m in (unet, vae, text) for p in m.parameters())
  print(f"folder: {n / 1e6:.0f}M parameters (unet {unet.num_parameters() / 1e6:.0f}M)")


def timed(cmd) -> float:
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, cwd=ROOT)
  return time.perf_counter() - t0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dir", default="/tmp/sd_bench")
  p.add_argument("--steps", type=int, default=20)
  args = p.parse_args()
  folder, workdir = os.path.join(args.dir, "sd15"), os.path.join(args.dir, "workdir")
  if not os.path.exists(os.path.join(folder, "model_index.json")):
    t0 = time.perf_counter()
    write_sd15_folder(folder)
    print(f"write diffusers folder: {time.perf_counter() - t0:.1f} s")
  shutil.rmtree(workdir, ignore_errors=True)
  py = sys.executable
  t_conv = timed([py, "-m", "ldm_jax.convert", "diffusers", folder, workdir])
  print(f"convert (python -m ldm_jax.convert diffusers): {t_conv:.1f} s")
  out = os.path.join(args.dir, "sample.png")
  t_sample = timed([py, "sample.py", f"--workdir={workdir}", "--num_samples=1",
                    f"--steps={args.steps}", "--sampler=ddim", "--guidance=7.5",
                    "--prompt=a photo of the red cat", f"--out={out}"])
  print(f"sample.py 1 image 512x512, DDIM {args.steps} steps, guidance 7.5 "
        f"(process start to PNG, compile included): {t_sample:.1f} s")
  print(f"convert + sample: {t_conv + t_sample:.1f} s")


if __name__ == "__main__":
  main()
