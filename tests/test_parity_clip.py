"""CLIPTextEncoder + converter against transformers' CLIPTextModel (random tiny models)."""
import jax
import numpy as np
import pytest

from ldm_jax.convert import clip as convert_clip
from ldm_jax.errors import UserError
from ldm_jax.models import clip

torch = pytest.importorskip("torch", exc_type=ImportError)
transformers = pytest.importorskip("transformers", exc_type=ImportError)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CONFIGS = [
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=100),
    dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
         hidden_act="gelu", max_position_embeddings=16, vocab_size=57),
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
         hidden_act="quick_gelu", max_position_embeddings=20, vocab_size=300,
         layer_norm_eps=1e-6),
]


def tiny_clip(seed, **cfg):
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
  with torch.no_grad():  # random non-trivial norms and biases
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def convert(model):
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  return convert_clip.convert(model.config.to_dict(), sd)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_hidden_states_match_transformers(index):
  cfg = CONFIGS[index]
  model = tiny_clip(index, **cfg)
  ours_cfg, params = convert(model)
  encoder = clip.from_config(ours_cfg)
  apply = jax.jit(lambda ids, m: encoder.apply({"params": params}, ids, m))
  rng = np.random.default_rng(index)
  length = cfg["max_position_embeddings"]
  ids = rng.integers(0, cfg["vocab_size"], (3, length)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, length // 2:] = 0  # a padded row (the first token is always kept)
  errs = []
  for m in (None, mask):
    with torch.no_grad():
      ref = model(torch.from_numpy(ids),
                  attention_mask=None if m is None else torch.from_numpy(m)).last_hidden_state
    ours = apply(ids.astype(np.int32), None if m is None else m.astype(bool))
    ref = ref.numpy()
    keep = np.ones(ids.shape, bool) if m is None else m.astype(bool)
    rel = np.abs(np.asarray(ours) - ref)[keep].max() / np.abs(ref).max()
    assert rel <= 1e-4, (index, m is not None, rel)
    errs.append(float(rel))
  print(f"max relative error without/with padding mask {errs}")
  # Shorter sequences use the first positions.
  short = ids[:, :5].astype(np.int32)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids[:, :5])).last_hidden_state.numpy()
  np.testing.assert_allclose(apply(short, None), ref, atol=1e-4, rtol=1e-4)


def test_converter_names_bad_keys():
  model = tiny_clip(0, **CONFIGS[0])
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  cfg = model.config.to_dict()
  extra = dict(sd, **{"encoder.layers.9.mlp.fc1.weight": np.zeros(1)})
  with pytest.raises(UserError, match="layers.9.mlp.fc1.weight"):
    convert_clip.convert(cfg, extra)
  less = {k: v for k, v in sd.items() if "layers.1.mlp.fc2.bias" not in k}
  with pytest.raises(UserError, match="layers.1.mlp.fc2.bias"):
    convert_clip.convert(cfg, less)
  with pytest.raises(UserError, match="hidden_act"):
    convert_clip.convert(dict(cfg, hidden_act="relu"), sd)
  with pytest.raises(UserError, match="num_attention_heads"):
    convert_clip.convert({k: v for k, v in cfg.items() if k != "num_attention_heads"}, sd)
  # Keys with the `text_model.` prefix (transformers 4 files, SD folders) or without it.
  _, params = convert_clip.convert(
      cfg, {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in sd.items()})
  assert jax.tree.structure(params) == jax.tree.structure(convert(model)[1])
