"""Every key of a reference component's config, classified: what a converter does with it.

A converted model must produce the reference's outputs, so no config key may be dropped
silently. Each component (scheduler, UNet, VAE, text encoder) has a `Keys` table:

  implemented  the converter reads the key; it checks the value itself (and a parity test
               covers the values it accepts)
  fixed        accepted only at the listed values, the behaviour ldm_jax implements (usually
               the reference's default); any other value is refused
  ignored      the key cannot change the outputs here; the table says why

`check` refuses any other key (unknown: a newer reference option we have not looked at) with
one line naming the component, the key and its value. Keys starting with '_' are diffusers'
metadata (`_class_name`, `_diffusers_version`, ...), which diffusers never passes to a model
or scheduler; `_class_name` is checked by each converter.
"""
import math
from typing import Any, Mapping, NamedTuple

from ldm_jax.errors import UserError


class Keys(NamedTuple):
  implemented: frozenset
  fixed: Mapping[str, tuple]
  ignored: Mapping[str, str]

  @property
  def known(self) -> frozenset:
    return self.implemented | set(self.fixed) | set(self.ignored)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
    return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b or (math.isinf(a) and math.isinf(b) and (a > 0) == (b > 0))
  return a == b


def check(config: Mapping[str, Any], keys: Keys, what: str, metadata_prefix: str = "_") -> None:
  """UserError (one line: `what`, the key, its value) for the first key of `config` that
  `keys` neither implements, nor accepts at its value, nor ignores."""
  for key, value in config.items():
    if key in keys.implemented or key in keys.ignored:
      continue
    if metadata_prefix and key.startswith(metadata_prefix):
      continue
    if key in keys.fixed:
      allowed = keys.fixed[key]
      if not any(_same(value, a) for a in allowed):
        raise UserError(f"{what} {key}={value!r} is not supported (only "
                        f"{' or '.join(repr(a) for a in allowed)}): ldm_jax would not "
                        "reproduce the reference's outputs")
      continue
    raise UserError(f"{what} {key}={value!r} is an option this converter does not know, so "
                    "it cannot reproduce it: not converted (see ldm_jax/convert/config_keys.py)")


# --- Schedulers (scheduler/scheduler_config.json). ---

_THRESHOLDING = "read only with thresholding=True (refused)"

SCHEDULER = Keys(
    implemented=frozenset({
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
        "rescale_betas_zero_snr", "timestep_spacing", "steps_offset", "set_alpha_to_one",
        "clip_sample", "clip_sample_range", "use_karras_sigmas", "final_sigmas_type",
        "lower_order_final", "skip_prk_steps"}),
    fixed={
        "trained_betas": (None,), "thresholding": (False,),
        "variance_type": (None, "fixed_small"),  # DPM-Solver's None is DDPM's fixed_small
        "solver_order": (2,), "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint",),
        "euler_at_final": (False,), "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,), "use_lu_lambdas": (False,), "use_flow_sigmas": (False,),
        "lambda_min_clipped": (-math.inf,), "use_dynamic_shifting": (False,),
        # EulerDiscreteScheduler: sigmas interpolated linearly at discrete timesteps, the
        # Karras ramp between the table's own ends.
        "interpolation_type": ("linear",), "timestep_type": ("discrete",),
        "sigma_min": (None,), "sigma_max": (None,),
    },
    ignored={
        "dynamic_thresholding_ratio": _THRESHOLDING, "sample_max_value": _THRESHOLDING,
        "flow_shift": "read only with use_flow_sigmas=True (refused)",
        "time_shift_type": "read only with use_dynamic_shifting=True (refused)",
    })

# The scheduler classes a workdir can be converted from, the sampler each becomes
# (config.ldm.sample.sampler: the images are the class's own), and the defaults diffusers gives
# the keys a scheduler_config.json leaves out (only keys that ldm_jax's samplers read). Any
# other class (LMSDiscreteScheduler, Heun, UniPC, ...) is refused: no sampler reproduces it.
SCHEDULER_CLASS_SAMPLER = {
    "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "pndm",
    "DPMSolverMultistepScheduler": "dpmpp_2m", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
}
SCHEDULER_CLASS_DEFAULTS = {
    "DDIMScheduler": dict(clip_sample=True, set_alpha_to_one=True, timestep_spacing="leading",
                          steps_offset=0),
    "DDPMScheduler": dict(clip_sample=True, timestep_spacing="leading", steps_offset=0),
    "PNDMScheduler": dict(set_alpha_to_one=False, timestep_spacing="leading", steps_offset=0,
                          skip_prk_steps=False),
    "DPMSolverMultistepScheduler": dict(timestep_spacing="linspace", steps_offset=0,
                                        use_karras_sigmas=False, final_sigmas_type="zero",
                                        lower_order_final=True),
    "EulerDiscreteScheduler": dict(timestep_spacing="linspace", steps_offset=0,
                                   use_karras_sigmas=False, final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(timestep_spacing="linspace", steps_offset=0),
}

# --- UNets (unet/config.json). ---

_FP16 = "float16 inference only: ldm_jax computes in float32"

UNET_CONDITION = Keys(
    implemented=frozenset({
        "sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift",
        "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
        "downsample_padding", "dropout", "norm_num_groups", "norm_eps", "cross_attention_dim",
        "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
        "use_linear_projection", "resnet_time_scale_shift"}),
    fixed={
        "center_input_sample": (False,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "only_cross_attention": (False,), "mid_block_scale_factor": (1,), "act_fn": ("silu",),
        "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
        "class_embed_type": (None,), "addition_embed_type": (None,),
        "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
        "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1,),
        "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
        "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
        "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
        "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
        "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
        "cross_attention_norm": (None,),
    },
    ignored={
        "upcast_attention": _FP16,
        "addition_embed_type_num_heads": "read only with addition_embed_type (refused)",
    })

UNET_PLAIN = Keys(
    implemented=frozenset({
        "sample_size", "in_channels", "out_channels", "freq_shift", "flip_sin_to_cos",
        "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
        "downsample_padding", "dropout", "attention_head_dim", "norm_num_groups",
        "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift", "add_attention",
        "num_class_embeds"}),
    fixed={
        "center_input_sample": (False,), "time_embedding_type": ("positional",),
        "time_embedding_dim": (None,), "mid_block_type": ("UNetMidBlock2D",),
        "mid_block_scale_factor": (1,), "downsample_type": ("conv",),
        "upsample_type": ("conv",), "act_fn": ("silu",), "class_embed_type": (None,),
    },
    ignored={
        "num_train_timesteps": "read only with time_embedding_type='learned' (refused)",
    })

# --- Autoencoder (vae/config.json). ---

VAE = Keys(
    implemented=frozenset({
        "in_channels", "out_channels", "down_block_types", "up_block_types",
        "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
        "scaling_factor", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"}),
    fixed={"act_fn": ("silu",), "shift_factor": (None,), "latents_mean": (None,),
           "latents_std": (None,)},
    ignored={
        "sample_size": "the tile size of diffusers' tiled decoding (off unless enabled); the "
                       "image size follows the UNet's sample_size",
        "force_upcast": _FP16,
    })

# --- Text encoder (text_encoder/config.json, transformers' CLIPTextConfig). ---

_GENERIC = ("a generic transformers option (output format, generation, training or "
            "fine-tuning) that CLIPTextModel's last hidden state does not read")
_TRANSFORMERS_GENERIC = (
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "transformers_version")

TEXT_ENCODER = Keys(
    implemented=frozenset({
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps"}),
    fixed={"model_type": ("clip_text_model",), "architectures": (("CLIPTextModel",), None),
           "use_attention_mask": (False,), "pruned_heads": ({},)},
    ignored={
        "projection_dim": "the projection of CLIPTextModelWithProjection; Stable Diffusion "
                          "conditions on CLIPTextModel's last hidden state",
        "attention_dropout": "dropout: inactive at inference",
        "dropout": "dropout: inactive at inference",
        "initializer_range": "initialisation only", "initializer_factor": "initialisation only",
        "bos_token_id": "token ids come from the tokenizer files; the hidden states do not "
                        "read them",
        "eos_token_id": "read only by the pooled output, which Stable Diffusion does not use",
        "pad_token_id": "token ids come from the tokenizer files; the hidden states do not "
                        "read them",
        "torch_dtype": "the stored weights' dtype: ldm_jax converts them to float32",
        "dtype": "the stored weights' dtype: ldm_jax converts them to float32",
        **{k: _GENERIC for k in _TRANSFORMERS_GENERIC},
    })
