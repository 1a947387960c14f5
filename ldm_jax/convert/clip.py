"""transformers' `CLIPTextModel` (config.json + state dict) -> `CLIPTextEncoder` config and params.

Pure functions over numpy arrays; reading the files is `ldm_jax.convert.weights`. Every tensor
of the state dict must be used and every parameter must be found: otherwise a UserError lists
the keys. Buffers that carry no weights (`position_ids`) are skipped.
"""
import numpy as np

from ldm_jax.convert import config_keys
from ldm_jax.errors import UserError
from ldm_jax.models import clip

PREFIX = "text_model."
IGNORED = ("text_model.embeddings.position_ids",)


def config_from_transformers(config: dict) -> dict:
  """The CLIPTextEncoder fields of a transformers CLIPTextConfig dict (text_encoder/config.json);
  every other key must be one `config_keys.TEXT_ENCODER` accepts."""
  config_keys.check(config, config_keys.TEXT_ENCODER, "text encoder config.json")
  missing = [k for k in clip.CONFIG_KEYS if k not in config]
  if missing:
    raise UserError(f"text encoder config.json lacks keys {missing}")
  out = {k: config[k] for k in clip.CONFIG_KEYS}
  if out["hidden_act"] not in clip.ACTIVATIONS:
    raise UserError(f"text encoder hidden_act={out['hidden_act']!r} is not supported "
                    f"(one of {clip.ACTIVATIONS})")
  return out


def _dense(sd, name):
  return {"kernel": sd[name + ".weight"].T, "bias": sd[name + ".bias"]}


def _norm(sd, name):
  return {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}


def _expected_keys(num_layers: int) -> set:
  keys = {PREFIX + "embeddings.token_embedding.weight",
          PREFIX + "embeddings.position_embedding.weight",
          PREFIX + "final_layer_norm.weight", PREFIX + "final_layer_norm.bias"}
  for i in range(num_layers):
    base = f"{PREFIX}encoder.layers.{i}."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
      keys |= {base + name + ".weight", base + name + ".bias"}
  return keys


def params_from_transformers(cfg: dict, state_dict: dict) -> dict:
  """Flax params of `clip.from_config(cfg)` from a CLIPTextModel state dict (numpy arrays).

  Keys may lack the `text_model.` prefix (as in some single-file checkpoints)."""
  sd = {}
  for k, v in state_dict.items():
    k = k if k.startswith(PREFIX) else PREFIX + k
    if k not in IGNORED:
      sd[k] = np.asarray(v, np.float32)
  expected = _expected_keys(cfg["num_hidden_layers"])
  missing, unknown = sorted(expected - set(sd)), sorted(set(sd) - expected)
  if missing or unknown:
    raise UserError(f"CLIP text encoder state dict does not match its config "
                    f"(num_hidden_layers={cfg['num_hidden_layers']}): missing keys {missing[:20]}"
                    f"{' ...' if len(missing) > 20 else ''}, unknown keys {unknown[:20]}"
                    f"{' ...' if len(unknown) > 20 else ''}")
  p = lambda name: PREFIX + name  # noqa: E731
  params = {
      "token_embedding": {"embedding": sd[p("embeddings.token_embedding.weight")]},
      "position_embedding": sd[p("embeddings.position_embedding.weight")],
      "final_layer_norm": _norm(sd, p("final_layer_norm")),
  }
  for i in range(cfg["num_hidden_layers"]):
    b = p(f"encoder.layers.{i}.")
    params[f"layers_{i}"] = {
        "layer_norm1": _norm(sd, b + "layer_norm1"),
        "layer_norm2": _norm(sd, b + "layer_norm2"),
        "self_attn": {n: _dense(sd, b + "self_attn." + n)
                      for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "fc1": _dense(sd, b + "mlp.fc1"),
        "fc2": _dense(sd, b + "mlp.fc2"),
    }
  _check_shapes(cfg, params)
  return params


def _check_shapes(cfg: dict, params: dict) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  model = clip.from_config(cfg)
  ids = np.zeros((1, cfg["max_position_embeddings"]), np.int32)
  want = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  bad = [jax.tree_util.keystr(k) for k in flat_want
         if k not in flat_got or tuple(flat_got[k].shape) != tuple(flat_want[k].shape)]
  if bad or len(flat_want) != len(flat_got):
    raise UserError(f"CLIP text encoder weights do not fit its config: {bad[:10]}")


def convert(config: dict, state_dict: dict) -> tuple[dict, dict]:
  """(CLIPTextEncoder config dict, params) from transformers' config.json dict and state dict."""
  cfg = config_from_transformers(config)
  return cfg, params_from_transformers(cfg, state_dict)
