"""The workloads of vs_diffusers.py as plain data (the child processes get them as JSON):
diffusers configs translated from the default preset's `configs/ldm.py` / `configs/autoencoder.py`
blocks, the table of workloads (`workloads`) and its dry-run shrinking (`shrink`)."""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NULL_CLASSES = 10  # the default preset's Fashion-MNIST classes; + 1 null label


def _unet2d_config(u, sample_size: int, in_channels: int, num_class_embeds=None) -> dict:
  """A diffusers UNet2DModel config for our `config.ldm.unet` block `u`."""
  n = len(u["channel_mult"])
  attn = set(u["attention_levels"])
  return dict(
      _class_name="UNet2DModel", sample_size=sample_size, in_channels=in_channels,
      out_channels=in_channels,
      block_out_channels=[u["model_channels"] * m for m in u["channel_mult"]],
      down_block_types=["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n)],
      up_block_types=["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n))],
      layers_per_block=u["num_res_blocks"], attention_head_dim=u["num_head_channels"],
      norm_num_groups=u["num_groups"], attn_norm_num_groups=u["num_groups"],
      norm_eps=1e-5, add_attention=bool(u["mid_attention"]),
      resnet_time_scale_shift="scale_shift" if u["scale_shift_norm"] else "default",
      num_class_embeds=num_class_embeds)


def _vae_config(a, channels: int, image_size: int) -> dict:
  """A diffusers AutoencoderKL config for our `config.autoencoder` block `a`."""
  n = len(a["ch_mult"])
  attn = set(a["attn_levels"])
  return dict(
      _class_name="AutoencoderKL", in_channels=channels, out_channels=channels,
      sample_size=image_size, block_out_channels=[a["ch"] * m for m in a["ch_mult"]],
      down_block_types=["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D"
                        for i in range(n)],
      up_block_types=["AttnUpDecoderBlock2D" if i in attn else "UpDecoderBlock2D"
                      for i in reversed(range(n))],
      layers_per_block=a["num_res_blocks"], latent_channels=a["z_channels"],
      norm_num_groups=a["num_groups"], mid_block_add_attention=bool(a["mid_attention"]),
      use_quant_conv=bool(a["quant_conv"]), use_post_quant_conv=bool(a["quant_conv"]))


def workloads(quick: bool) -> dict:
  from configs import ldm as ldm_configs  # pylint: disable=g-import-not-at-top
  c = ldm_configs.get_config("default")
  unet, ae = c.ldm.unet.to_dict(), c.autoencoder.to_dict()
  f = 2 ** (len(ae["ch_mult"]) - 1)
  latent = c.data.image_size // f
  plain = dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(),
               num_head_channels=32, num_groups=32, mid_attention=False,
               scale_shift_norm=False)
  attn = dict(plain, attention_levels=(1, 2), mid_attention=True)
  sd = dict(_class_name="UNet2DConditionModel", sample_size=64, cross_attention_dim=768,
            attention_head_dim=8, layers_per_block=2,
            block_out_channels=[320, 640, 1280, 1280])
  reps = (lambda q, full: q) if quick else (lambda q, full: full)
  return {
      "train_plain": dict(kind="train", model=_unet2d_config(plain, 32, 4), batch=32, size=32,
                          channels=4, reps=reps(2, 5),
                          label="UNet2DModel (64,128,128), 2 blocks/level, no attention; "
                                "32x32x4, batch 32: train step"),
      "train_attn": dict(kind="train", model=_unet2d_config(attn, 32, 4), batch=32, size=32,
                         channels=4, reps=reps(2, 5),
                         label="same, attention in the last two levels and the middle"),
      "sample_default": dict(kind="sample", model=_unet2d_config(unet, latent, 4, NULL_CLASSES + 1),
                             batch=64, size=latent, channels=4, steps=10 if quick else 50,
                             guidance=3.0, reps=reps(1, 3),
                             label=f"default LDM UNet ({latent}x{latent}x4, class-conditional):"
                                   f" 64 images, DDIM-{10 if quick else 50}, guidance 3 "
                                   "(batch 128)"),
      "ae_encode": dict(kind="encode", model=_vae_config(ae, c.data.channels, c.data.image_size),
                        batch=64, size=c.data.image_size, channels=c.data.channels,
                        reps=reps(5, 20),
                        label=f"default autoencoder: encode 64 {c.data.image_size}x"
                              f"{c.data.image_size}x{c.data.channels} images"),
      "ae_decode": dict(kind="decode", model=_vae_config(ae, c.data.channels, c.data.image_size),
                        batch=64, size=latent, channels=ae["z_channels"], reps=reps(5, 20),
                        label=f"default autoencoder: decode 64 {latent}x{latent}x"
                              f"{ae['z_channels']} latents"),
      "sd_step": dict(kind="guided_step", model=sd, batch=2, size=64, channels=4, context=(77, 768),
                      reps=1, full_only=True,
                      label="Stable Diffusion 1.x UNet (860M): one guided step, batch 2, "
                            "64x64x4, 77x768 context"),
      **{f"conv_{n}x{n}": dict(kind="conv", model=dict(_class_name="conv", features=128),
                               batch=128, size=n, channels=256, reps={2: 50, 4: 20, 8: 5}[n],
                               on_request=True,
                               label=f"one 3x3 convolution at {n}x{n}, batch 128, 256 -> 128 "
                                     "channels")
         for n in (2, 4, 8)},
  }


def shrink(w: dict) -> dict:
  """A dry-run copy of workload `w`: the same code path with tiny shapes and one call."""
  w = json.loads(json.dumps(w))
  m = w["model"]
  w["label"] = "(dry run, tiny shapes) " + w["label"]
  if w["kind"] == "conv":
    m["features"] = 8
    w.update(batch=4, channels=16, reps=1)
    return w
  m["block_out_channels"] = [min(c, 16 if m["_class_name"] != "UNet2DConditionModel" else 32)
                             for c in m["block_out_channels"]]
  m["norm_num_groups"] = 4
  if "attn_norm_num_groups" in m:
    m["attn_norm_num_groups"] = 4
  if m["_class_name"] == "UNet2DModel":
    m["attention_head_dim"] = 4
  if "cross_attention_dim" in m:
    m.update(cross_attention_dim=16, attention_head_dim=2)
    w["context"] = [5, 16]
  w.update(batch=min(w["batch"], 4), reps=1, size=min(w["size"], 16 if w["kind"] == "encode"
                                                              else 8))
  if "steps" in w:
    w["steps"] = 3
  return w
