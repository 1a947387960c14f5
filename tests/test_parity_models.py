"""Reference parity: diffusers / CompVis UNets and KL autoencoders converted to ours give the
same outputs (max error <= 1e-4 of the reference's max |output|, float32).

Reference models are small, randomly initialised diffusers models with EVERY parameter
perturbed (diffusers zero- or one-initialises some), so a wrong mapping cannot hide. CompVis
checkpoints are made from them by renaming keys into LDM's layout; diffusers' own
CompVis -> diffusers converter (`single_file_utils`) must map them back exactly, so the
CompVis names are checked by diffusers, not only by us.
"""
import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

from ldm_jax.convert import compvis, diffusers_models as dm  # noqa: E402
from ldm_jax.convert.torch_params import Fused, params_from_state_dict  # noqa: E402
from ldm_jax.errors import UserError  # noqa: E402
from ldm_jax.models import layers  # noqa: E402
from ldm_jax.models.unet import UNet  # noqa: E402
from ldm_jax.train.autoencoder_task import build_autoencoder  # noqa: E402
from ldm_jax.train.diffusion_task import build_unet  # noqa: E402

from configs import autoencoder as ae_configs
from configs import ldm as ldm_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
CTX = 6
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _perturb(model):
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      std = 1 / np.sqrt(np.prod(p.shape[1:])) if p.ndim > 1 else 0.1
      p.add_(torch.randn(p.shape, generator=gen) * std)
  return model.eval()


def _numpy_state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _config(model):
  return {**model.config, "_class_name": type(model).__name__}


def _rel(ours_nhwc, ref_nchw):
  ours = np.asarray(ours_nhwc).transpose(0, 3, 1, 2)
  return float(np.abs(ours - ref_nchw).max() / np.abs(ref_nchw).max())


def _inputs(channels=3, size=8):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, channels, size, size)).astype(np.float32)
  return x, np.array([3, 731]), rng.normal(size=(2, 5, CTX)).astype(np.float32)


def _unet_via_config(cfg, out_channels):
  """Our UNet built the way training / sampling builds it: configs/ldm.py + build_unet."""
  ldm = ldm_configs.ldm_block()
  ldm.unet.update(cfg)
  ldm.conditioning.kind = "text" if cfg["context_dim"] else "none"
  return build_unet(ldm, out_channels, 0)


def _check_unet(torch_model, cfg, params, context):
  x, t, ctx = _inputs(torch_model.config.in_channels)
  kw = {"encoder_hidden_states": torch.from_numpy(ctx)} if context else {}
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x), torch.from_numpy(t), **kw).sample.numpy()
  unet = _unet_via_config(cfg, torch_model.config.out_channels)
  assert unet == dm.unet_module(cfg, torch_model.config.out_channels)
  out = _jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, context=c))(
      params, x.transpose(0, 2, 3, 1), t, ctx if context else None)
  err = _rel(out, ref)
  print(f"max relative error {err:.2e}")
  assert err <= TOL


def _check_vae(torch_model, cfg, params):
  x, _, _ = _inputs(torch_model.config.in_channels, size=16)
  with torch.no_grad():
    post = torch_model.encode(torch.from_numpy(x)).latent_dist
    z = np.random.default_rng(1).normal(size=post.mean.shape).astype(np.float32)
    dec = torch_model.decode(torch.from_numpy(z)).sample.numpy()
  ae = ae_configs.base_config().autoencoder
  ae.update(cfg)
  vae = build_autoencoder(ae, torch_model.config.in_channels)

  @_jit
  def run(p, x, z):
    posterior = vae.apply({"params": p}, x, method=vae.encode)
    return posterior.mean, posterior.logvar, vae.apply({"params": p}, z, method=vae.decode)

  mean, logvar, rec = run(params, x.transpose(0, 2, 3, 1), z.transpose(0, 2, 3, 1))
  errs = [_rel(mean, post.mean.numpy()), _rel(logvar, post.logvar.numpy()), _rel(rec, dec)]
  print(f"max relative errors mean/logvar/decode {errs}")
  assert max(errs) <= TOL


# --- diffusers models. ---

def test_unet2d_condition_model_linear_projection():
  """SD 2.x-like: linear projections, per-level heads and transformer depths, plus the
  scale-shift ResBlocks, the other timestep-embedding layout and downsample_padding=0.
  (SD 1.x's conv projections and int heads: `test_compvis_unet_spatial_transformer`, which
  converts both ways.)"""
  torch_model = _perturb(diffusers.UNet2DConditionModel(
      block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=CTX,
      norm_num_groups=4, in_channels=3, out_channels=3,
      down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
      attention_head_dim=[1, 4], transformer_layers_per_block=[1, 2],
      use_linear_projection=True, resnet_time_scale_shift="scale_shift", freq_shift=1,
      flip_sin_to_cos=False, downsample_padding=0))
  cfg, params = dm.unet_from_diffusers(_config(torch_model), _numpy_state(torch_model))
  assert cfg["symmetric_downsample"] is False
  _check_unet(torch_model, cfg, params, context=True)


@pytest.mark.parametrize("attention", [True, False])
def test_unet2d_model(attention):
  blocks = ("AttnDownBlock2D", "AttnUpBlock2D") if attention else ("DownBlock2D", "UpBlock2D")
  torch_model = _perturb(diffusers.UNet2DModel(
      block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
      down_block_types=("DownBlock2D", blocks[0]), up_block_types=(blocks[1], "UpBlock2D"),
      add_attention=attention, in_channels=3, out_channels=2))
  cfg, params = dm.unet_from_diffusers(_config(torch_model), _numpy_state(torch_model))
  assert cfg["mid_attention"] is attention
  _check_unet(torch_model, cfg, params, context=False)


def test_unet2d_model_class_conditional():
  """A class-conditional UNet2DModel (num_class_embeds: the classes and, last, our null
  label) with downsample_padding=0 and three levels (two downsamples), the layout of this
  project's default preset."""
  torch_model = _perturb(diffusers.UNet2DModel(
      block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
      attention_head_dim=4, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=5,
      downsample_padding=0, in_channels=3, out_channels=3))
  config = _config(torch_model)
  cfg, params = dm.unet_from_diffusers(config, _numpy_state(torch_model))
  assert dm.unet_num_classes(config) == 4 and cfg["symmetric_downsample"] is False
  x, t, _ = _inputs(3)
  labels = np.array([1, 4])  # a class and the null label (row 4)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x), torch.from_numpy(t),
                      class_labels=torch.from_numpy(labels)).sample.numpy()
  ldm = ldm_configs.ldm_block()
  ldm.unet.update(cfg)
  ldm.conditioning.kind = "class"
  unet = build_unet(ldm, 3, 4)  # how load.py builds a class-conditional stage
  assert unet == dm.unet_module(cfg, 3, 4) and unet.null_label == 4
  out = _jit(lambda p, x, t, y: unet.apply({"params": p}, x, t, labels=y))(
      params, x.transpose(0, 2, 3, 1), t, labels)
  err = _rel(out, ref)
  print(f"max relative error {err:.2e}")
  assert err <= TOL
  # labels=None is our null label: diffusers' last class row.
  none = _jit(lambda p, x, t: unet.apply({"params": p}, x, t))(params, x.transpose(0, 2, 3, 1), t)
  np.testing.assert_allclose(np.asarray(none)[1], np.asarray(out)[1], rtol=1e-5, atol=1e-5)


def test_autoencoder_kl_without_quant_convs():
  """3 blocks, no quant_conv / post_quant_conv (2 blocks with them: test_compvis_autoencoder,
  which converts the same weights from diffusers' names too)."""
  torch_model = _perturb(diffusers.AutoencoderKL(
      block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
      up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=4,
      latent_channels=3, use_quant_conv=False, use_post_quant_conv=False))
  cfg, params = dm.vae_from_diffusers(_config(torch_model), _numpy_state(torch_model))
  assert cfg["quant_conv"] is False and "quant_conv" not in params
  _check_vae(torch_model, cfg, params)


# --- CompVis checkpoints (diffusers' single-file converter as the oracle for the names). ---

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _legacy_qkv(q, k, v, heads):
  """Separate q/k/v rows -> LDM's QKVAttentionLegacy rows [head][q|k|v][head_dim]."""
  split = [a.reshape((heads, -1) + a.shape[1:]) for a in (q, k, v)]
  return np.stack(split, axis=1).reshape((-1,) + q.shape[1:])


def _to_compvis_unet(state, nrb, n, attn_levels, heads=None):
  """diffusers UNet keys -> `model.diffusion_model.*` keys of LDM's openaimodel.UNetModel.

  With `heads`, diffusers' self-attention (UNet2DModel) becomes LDM's AttentionBlock: one
  legacy-ordered conv1d `qkv` and a conv1d `proj_out`.
  """
  fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
  rules = [
      (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
       lambda m: f"input_blocks.{1 + int(m[1]) * (nrb + 1) + int(m[2])}.0.{_RES[m[3]]}"),
      (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
       lambda m: f"input_blocks.{1 + int(m[1]) * (nrb + 1) + int(m[2])}.1.{m[3]}"),
      (r"down_blocks\.(\d+)\.downsamplers\.0\.conv",
       lambda m: f"input_blocks.{1 + int(m[1]) * (nrb + 1) + nrb}.0.op"),
      (r"mid_block\.resnets\.(\d)\.(\w+)", lambda m: f"middle_block.{2 * int(m[1])}.{_RES[m[2]]}"),
      (r"mid_block\.attentions\.0\.(.*)", lambda m: f"middle_block.1.{m[1]}"),
      (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
       lambda m: f"output_blocks.{int(m[1]) * (nrb + 1) + int(m[2])}.0.{_RES[m[3]]}"),
      (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)",
       lambda m: f"output_blocks.{int(m[1]) * (nrb + 1) + int(m[2])}.1.{m[3]}"),
      (r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
       lambda m: f"output_blocks.{int(m[1]) * (nrb + 1) + nrb}."
                 f"{2 if n - 1 - int(m[1]) in attn_levels else 1}.conv"),
  ]
  out = {}
  for key, value in state.items():
    module, leaf = key.rsplit(".", 1)
    new = fixed.get(module)
    for pattern, repl in rules:
      if new is None and re.fullmatch(pattern, module):
        new = re.sub(pattern, repl, module)
    assert new is not None, key
    out[f"model.diffusion_model.{new}.{leaf}"] = value
  if heads:  # fuse q/k/v of every self-attention into LDM's AttentionBlock layout
    for key in [k for k in out if k.endswith(".to_q.weight") or k.endswith(".to_q.bias")]:
      base, leaf = key.rsplit(".to_q.", 1)
      q, k, v = (out.pop(f"{base}.to_{c}.{leaf}") for c in "qkv")
      fused = _legacy_qkv(q, k, v, heads[base])
      out[f"{base}.qkv.{leaf}"] = fused[..., None] if leaf == "weight" else fused
      w = out.pop(f"{base}.to_out.0.{leaf}")
      out[f"{base}.proj_out.{leaf}"] = w[..., None] if leaf == "weight" else w
      out[f"{base}.norm.{leaf}"] = out.pop(f"{base}.group_norm.{leaf}")
  return out


def _compvis_unet_case(params):
  """A random diffusers UNet for LDM's UNet params and its checkpoint in LDM's layout."""
  full = {"model": {"params": {"unet_config": {"params": params}, "first_stage_config": {
      "params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    config = sfu.create_unet_diffusers_config_from_ldm(full, {}, image_size=64)
  torch_model = _perturb(diffusers.UNet2DConditionModel(**config))
  state = _numpy_state(torch_model)
  n = len(params["channel_mult"])
  levels = [i for i in range(n) if 2 ** i in params["attention_resolutions"]]
  ckpt = _to_compvis_unet(state, params["num_res_blocks"], n, levels)
  back = sfu.convert_ldm_unet_checkpoint(ckpt, config)
  assert back.keys() == state.keys()
  assert all(np.array_equal(back[k], state[k]) for k in state)
  return torch_model, ckpt


def test_compvis_unet_spatial_transformer():
  """SD 1.x's layout (conv projections, int heads), from a CompVis checkpoint and from the
  same weights in diffusers' UNet2DConditionModel."""
  params = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32,
                attention_resolutions=[1], num_res_blocks=1, channel_mult=[1, 2], num_heads=2,
                use_spatial_transformer=True, transformer_depth=2, context_dim=CTX,
                use_linear_in_transformer=False, legacy=False)
  torch_model, ckpt = _compvis_unet_case(params)
  ckpt.update({"first_stage_model.decoder.conv_in.weight": np.zeros(1),
               "cond_stage_model.x": np.zeros(1)})  # other models' keys are not the UNet's
  cfg, ours = compvis.unet_from_compvis({"target": "UNetModel", "params": params}, ckpt)
  _check_unet(torch_model, cfg, ours, context=True)
  # The diffusers converter gives the same model and parameters from diffusers' names.
  d_cfg, d_params = dm.unet_from_diffusers(_config(torch_model), _numpy_state(torch_model))
  assert d_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, d_params, ours)
  # The EMA copy (LitEma: "model_ema." + the name without dots) is found by name.
  ema = {f"model_ema.diffusion_model{k[len('model.diffusion_model.'):].replace('.', '')}": v
         for k, v in ckpt.items() if k.startswith("model.diffusion_model.")}
  unet_keys = {k[len("model.diffusion_model."):]: v for k, v in ckpt.items()
               if k.startswith("model.diffusion_model.")}
  picked = compvis._ema_state_dict({**ckpt, **ema})  # pylint: disable=protected-access
  assert picked.keys() == unet_keys.keys()
  assert all(picked[k] is unet_keys[k] for k in unet_keys)


def test_legacy_attention_block_layout():
  """Our fusion of LDM's legacy qkv against LDM's QKVAttentionLegacy, written out in torch."""
  rng = np.random.default_rng(0)
  c, heads, hw = 8, 2, 5
  w = {n: rng.normal(size=s).astype(np.float32) for n, s in [
      ("q", (c, c)), ("k", (c, c)), ("v", (c, c)), ("qb", (c,)), ("kb", (c,)), ("vb", (c,))]}
  x = rng.normal(size=(1, hw, c)).astype(np.float32)
  qkv_w, qkv_b = _legacy_qkv(w["q"], w["k"], w["v"], heads), _legacy_qkv(
      w["qb"], w["kb"], w["vb"], heads)
  # openaimodel.QKVAttentionLegacy.forward on qkv = conv1d(x) [B, 3C, T]:
  qkv = torch.einsum("oc,btc->bot", torch.from_numpy(qkv_w), torch.from_numpy(x))
  qkv = qkv + torch.from_numpy(qkv_b)[None, :, None]
  ch = c // heads
  q, k, v = qkv.reshape(heads, ch * 3, hw).split(ch, dim=1)
  scale = 1 / np.sqrt(np.sqrt(ch))
  weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
  ref = torch.einsum("bts,bcs->bct", weight, v).reshape(1, c, hw).numpy()
  # Ours: the converted fused kernel, heads as in SpatialSelfAttention.
  (kernel,), (bias,) = ([params_from_state_dict(
      {"qkv": {leaf: jax.ShapeDtypeStruct(s, jnp.float32)}}, {f"a.qkv.{t}": arr},
      lambda p: Fused(("a.qkv",), heads), "test")["qkv"][leaf]]
      for leaf, s, t, arr in [("kernel", (c, 3 * c), "weight", qkv_w[..., None]),
                              ("bias", (3 * c,), "bias", qkv_b)])
  q, k, v = np.split(x @ kernel + bias, 3, axis=-1)
  ours = jax.nn.dot_product_attention(*(a.reshape(1, hw, heads, ch) for a in (q, k, v)))
  np.testing.assert_allclose(np.asarray(ours).reshape(1, hw, c).transpose(0, 2, 1), ref,
                             rtol=1e-5, atol=1e-5)


def test_compvis_unet_attention_block():
  """LDM's plain self-attention UNet (AttentionBlock, legacy qkv order); diffusers'
  UNet2DModel is the same network with q/k/v apart."""
  torch_model = _perturb(diffusers.UNet2DModel(
      block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=16, norm_eps=1e-5,
      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"), in_channels=3, out_channels=3))
  state = _numpy_state(torch_model)
  heads = {p: 64 // 16 for p in ("model.diffusion_model.input_blocks.3.1",
                                 "model.diffusion_model.middle_block.1",
                                 "model.diffusion_model.output_blocks.0.1",
                                 "model.diffusion_model.output_blocks.1.1")}
  ckpt = _to_compvis_unet(state, 1, 2, [1], heads)
  params = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32,
                attention_resolutions=[2], num_res_blocks=1, channel_mult=[1, 2],
                num_head_channels=16)
  cfg, ours = compvis.unet_from_compvis(params, ckpt)
  _check_unet(torch_model, cfg, ours, context=False)


def _to_compvis_vae(state, n):
  attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
  rules = [
      (r"(encoder|decoder)\.conv_norm_out", r"\1.norm_out"),
      (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", r"encoder.down.\1.block.\2.\3"),
      (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder.down.\1.downsample.conv"),
      (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
       lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"),
      (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv",
       lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv"),
      (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)",
       lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
      (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)",
       lambda m: f"{m[1]}.mid.attn_1.{attn[m[2]]}"),
  ]
  out = {}
  for key, value in state.items():
    module, leaf = key.rsplit(".", 1)
    for pattern, repl in rules:
      if re.fullmatch(pattern, module):
        module = re.sub(pattern, repl, module)
        break
    if ".attn_1." in module and value.ndim == 2:
      value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
    out[f"first_stage_model.{module.replace('conv_shortcut', 'nin_shortcut')}.{leaf}"] = value
  return out


def test_compvis_autoencoder():
  dd = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
            ch_mult=[1, 2], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
  full = {"model": {"params": {"first_stage_config": {"params": {"embed_dim": 4, "ddconfig": dd}}}}}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    config = sfu.create_vae_diffusers_config_from_ldm(full, {}, image_size=64)
  torch_model = _perturb(diffusers.AutoencoderKL(**config))
  state = _numpy_state(torch_model)
  ckpt = _to_compvis_vae(state, 2)
  back = sfu.convert_ldm_vae_checkpoint(ckpt, config)
  assert back.keys() == state.keys()
  assert all(np.array_equal(back[k], state[k]) for k in state)
  ckpt.update({"first_stage_model.loss.logvar": np.zeros(()),
               "model.diffusion_model.x": np.zeros(1)})
  cfg, params = compvis.vae_from_compvis(full["model"]["params"]["first_stage_config"], ckpt)
  _check_vae(torch_model, cfg, params)
  d_cfg, d_params = dm.vae_from_diffusers(_config(torch_model), state)
  assert d_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, d_params, params)


# --- Errors and defaults. ---


def test_mismatched_weights_and_unsupported_config_are_listed():
  torch_model = diffusers.UNet2DConditionModel(
      block_out_channels=(8,), layers_per_block=1, cross_attention_dim=CTX, norm_num_groups=4,
      down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
      attention_head_dim=2)
  state = _numpy_state(torch_model)
  del state["conv_in.weight"], state["mid_block.attentions.0.proj_in.bias"]
  state["extra.weight"] = np.zeros(2)
  state["conv_out.bias"] = np.zeros(5)
  with pytest.raises(UserError) as info:
    dm.unet_from_diffusers(_config(torch_model), state)
  msg = str(info.value)
  assert ("missing keys (2): conv_in.weight, mid_block.attentions.0.proj_in.bias" in msg and
          "unknown keys (1): extra.weight" in msg and
          "conv_out.bias (5,) != (4,) of our conv_out/bias" in msg), msg
  with pytest.raises(UserError, match="center_input_sample=True"):
    dm.unet_from_diffusers({**_config(torch_model), "center_input_sample": True}, state)
  with pytest.raises(UserError, match="num_classes=1000"):
    compvis.unet_from_compvis(dict(in_channels=4, out_channels=4, model_channels=32,
                                   attention_resolutions=[], num_res_blocks=1,
                                   channel_mult=[1], num_heads=1, num_classes=1000), {})


def test_config_defaults_keep_the_original_models():
  ldm = ldm_configs.get_config("text").ldm
  unet = build_unet(ldm, 4, 0)
  for field in ("norm_eps", "symmetric_downsample", "flip_sin_to_cos", "freq_shift",
                "mid_attention", "level_heads", "level_transformer_depth"):
    assert getattr(unet, field) == getattr(UNet, field), field
  assert unet.context_dim == ldm.conditioning.text_width
  ae = build_autoencoder(ae_configs.get_config("default").autoencoder, 1)
  assert ae.quant_conv
  emb = layers.timestep_embedding(np.array([5.0]), 8, freq_shift=1.0)
  ref = np.exp(-np.log(10000.0) * np.arange(4) / 3) * 5.0  # diffusers' downscale_freq_shift
  np.testing.assert_allclose(emb[0], np.concatenate([np.cos(ref), np.sin(ref)]), rtol=1e-5)


def test_stable_diffusion_15_sized_unet_and_vae_map_every_key():
  """Names and shapes at full size: SD 1.5's UNet and VAE configs, built on torch's meta
  device (no memory), with zero-stride numpy stand-ins for the weights."""
  sd15_unet = dict(
      _class_name="UNet2DConditionModel", attention_head_dim=8, cross_attention_dim=768,
      block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, norm_eps=1e-5,
      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4)
  sd_vae = dict(_class_name="AutoencoderKL", block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, layers_per_block=2,
                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4)
  for config, cls, convert, count in [
      (sd15_unet, diffusers.UNet2DConditionModel, dm.unet_from_diffusers, 859_520_964),
      (sd_vae, diffusers.AutoencoderKL, dm.vae_from_diffusers, 83_653_863)]:
    with torch.device("meta"):
      model = cls(**{k: v for k, v in config.items() if k != "_class_name"})
    zero = np.zeros((), np.float32)
    state = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in model.state_dict().items()}
    _, params = convert(config, state)
    assert sum(p.size for p in jax.tree.leaves(params)) == count
