"""End to end: a tiny random diffusers StableDiffusionPipeline folder -> `python -m
ldm_jax.convert diffusers` -> LatentDiffusionPipeline.from_workdir, sampled from the same
initial latents with DDIM and classifier-free guidance: the same images as diffusers."""
import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ImportError)
diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
transformers = pytest.importorskip("transformers", exc_type=ImportError)

from ldm_jax.convert.__main__ import main as convert_main  # noqa: E402
from ldm_jax.convert.reference import PROMPTS, WORDS, save_sd_folder, write_tokenizer  # noqa: E402,F401
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.sampling import LatentDiffusionPipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_sd(tmp_path):
  torch.manual_seed(0)
  tok = write_tokenizer(str(tmp_path / "tok"))
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=4, norm_num_groups=32)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), latent_channels=4,
      layers_per_block=1, norm_num_groups=32, sample_size=16)
  with torch.no_grad():  # random norms and biases; larger outputs so guidance matters
    for model in (unet, vae):
      for name, p in model.named_parameters():
        if name.endswith("bias") or "norm" in name:
          p.add_(0.1 * torch.randn_like(p))
  return save_sd_folder(str(tmp_path / "sd"), str(tmp_path / "tok"), tok, text, unet, vae)


def test_converted_sd_folder_samples_like_diffusers(tmp_path):
  ref_pipe, folder = tiny_sd(tmp_path)
  workdir = str(tmp_path / "workdir")
  assert convert_main(["diffusers", folder, workdir]) == 0
  assert convert_main(["diffusers", folder, workdir]) == 1  # never overwrites a workdir
  assert sorted(os.listdir(os.path.join(workdir, "tokenizer"))) == [
      "merges.txt", "tokenizer_config.json", "vocab.json"]
  config = json.load(open(os.path.join(workdir, "config.json"), encoding="utf-8"))
  assert config["ldm"]["conditioning"]["kind"] == "clip"
  assert config["ldm"]["scheduler"]["steps_offset"] == 1
  assert config["ldm"]["diffusion"]["latent_scale"] == pytest.approx(0.18215)

  pipe = LatentDiffusionPipeline.from_workdir(workdir)
  latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
  ours = pipe.sample(2, sampler="ddim", steps=10, guidance=7.5, prompt=PROMPTS,
                     latents=latents.transpose(0, 2, 3, 1), as_uint8=False)
  with torch.no_grad():
    ref = ref_pipe(PROMPTS, num_inference_steps=10, guidance_scale=7.5, output_type="np",
                   latents=torch.from_numpy(latents)).images
  ours = (np.asarray(ours) + 1.0) / 2.0
  err = np.abs(ours - ref).max()
  print(f"max |ours - diffusers| image error: {err:.2e} (image std {ref.std():.3f})")
  assert ours.shape == ref.shape == (2, 16, 16, 3)
  assert err <= 1e-3
  # Guidance changes the image (the conditioning reaches the UNet).
  plain = pipe.sample(2, sampler="ddim", steps=10, guidance=1.0, prompt=PROMPTS,
                      latents=latents.transpose(0, 2, 3, 1), as_uint8=False)
  assert np.abs((np.asarray(plain) + 1) / 2 - ours).max() > 1e-2


def compvis_checkpoint(pipe, path):
  """The tiny pipeline's weights in a CompVis SD 1.x checkpoint's layout (the renaming helpers
  of tests/test_parity_models.py), and the matching yaml."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  import test_parity_models as tpm  # pylint: disable=g-import-not-at-top
  state = lambda m: {k: v.numpy() for k, v in m.state_dict().items()}  # noqa: E731
  vae = state(pipe.vae)
  norms = {k: vae.pop(k) for k in list(vae) if k.endswith("attentions.0.group_norm.weight")}
  ckpt = {**tpm._to_compvis_unet(state(pipe.unet), 1, 2, [0]), **tpm._to_compvis_vae(vae, 2)}
  ckpt.update({f"first_stage_model.{k.split('.')[0]}.mid.attn_1.norm.weight": v
               for k, v in norms.items()})
  ckpt.update({"cond_stage_model.transformer.text_model." + k: v
               for k, v in state(pipe.text_encoder).items()})
  save_file({k: np.ascontiguousarray(v) for k, v in ckpt.items()}, str(path))
  return {"model": {"params": {
      "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 8,
      "channels": 4, "scale_factor": 0.18215,
      "unet_config": {"params": {
          "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
          "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 2],
          "num_heads": 4, "use_spatial_transformer": True, "transformer_depth": 1,
          "context_dim": 32, "legacy": False}},
      "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
          "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3,
          "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [],
          "dropout": 0.0}}},
      "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                            "params": {"num_attention_heads": 4}}}}}  # 8-wide heads


def test_compvis_checkpoint_converts_to_the_same_model(tmp_path):
  import yaml  # pylint: disable=g-import-not-at-top
  ref_pipe, folder = tiny_sd(tmp_path)
  config = compvis_checkpoint(ref_pipe, tmp_path / "sd.safetensors")
  (tmp_path / "sd.yaml").write_text(yaml.safe_dump(config))
  args = ["compvis", str(tmp_path / "sd.safetensors"), str(tmp_path / "cv"),
          "--config", str(tmp_path / "sd.yaml")]
  assert convert_main(args) == 1  # no tokenizer
  assert convert_main(args + ["--tokenizer", os.path.join(folder, "tokenizer")]) == 0
  assert convert_main(["diffusers", folder, str(tmp_path / "df")]) == 0
  a = LatentDiffusionPipeline.from_workdir(str(tmp_path / "cv"))
  b = LatentDiffusionPipeline.from_workdir(str(tmp_path / "df"))
  assert a.model.unet == b.model.unet and a.model.text_encoder == b.model.text_encoder
  assert a.autoencoder == b.autoencoder and a.sampler_options == b.sampler_options
  assert a.latent_shape == b.latent_shape and a.latent_scale == b.latent_scale
  for x, y in ((a.params, b.params), (a.ae_params, b.ae_params)):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    jax.tree.map(np.testing.assert_array_equal, x, y)
  np.testing.assert_array_equal(a.schedule.alphas_cumprod, b.schedule.alphas_cumprod)


def test_convert_errors_name_the_problem(tmp_path):
  with pytest.raises(SystemExit):
    convert_main(["nonsense", "a", "b"])
  assert convert_main(["diffusers", str(tmp_path), str(tmp_path / "w")]) == 1  # no model_index
  os.makedirs(tmp_path / "sd" / "unet")
  (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "X"]}))
  from ldm_jax.convert import stable_diffusion  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=r"\['vae', 'text_encoder', 'tokenizer', 'scheduler'\]"):
    stable_diffusion.convert_diffusers(str(tmp_path / "sd"), str(tmp_path / "w"))
  with pytest.raises(UserError, match="beta_schedule='sigmoid'"):
    stable_diffusion.schedule_settings(dict(num_train_timesteps=1000, beta_start=0.1,
                                            beta_end=0.2, beta_schedule="sigmoid"))
  diff, opts = stable_diffusion.schedule_settings(dict(  # SD 1.x's scheduler_config.json
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True))
  assert diff["schedule"] == "scaled_linear" and diff["parameterization"] == "eps"
  assert opts == dict(timestep_spacing=None, steps_offset=1, set_alpha_to_one=False,
                      clip_sample=0.0)
  with pytest.raises(UserError, match=r"\['beta_end'\]"):
    stable_diffusion.schedule_settings(dict(num_train_timesteps=1000, beta_start=0.1,
                                            beta_schedule="linear"))
