"""Text conditioning: the word tokenizer, the transformer text encoder and the caption helper."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.errors import UserError
from ldm_jax.models import conditioning
from ldm_jax.models.conditioning import TextEncoder, Tokenizer

# See tests/test_unet.py: same results, a fraction of XLA:CPU's compile time.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

CAPTIONS = ["A photo of a Dress", "a dress", "a coat!", "Coat, grayscale product photo",
            "a t-shirt/top"]


def test_vocabulary_order_and_special_tokens():
  tok = Tokenizer.from_captions(CAPTIONS)
  # counts: a=4, coat=2, dress=2, photo=2, then single words alphabetically.
  assert tok.vocab[:4] == ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
  assert tok.vocab[4:8] == ["a", "coat", "dress", "photo"]
  assert tok.vocab[8:] == ["grayscale", "of", "product", "shirt", "t", "top"]
  assert (conditioning.PAD, conditioning.UNK, conditioning.BOS, conditioning.EOS) == (0, 1, 2, 3)
  assert Tokenizer.from_captions(CAPTIONS, max_vocab=6).vocab == tok.vocab[:6]
  with pytest.raises(UserError):
    Tokenizer.from_captions(CAPTIONS, max_vocab=3)


def test_encode_decode_unknown_words_truncation_and_mask():
  tok = Tokenizer.from_captions(CAPTIONS)
  ids, mask = tok.encode(["A DRESS", "a hat, a coat", ""], max_length=6)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (3, 6)
  a, dress, coat = (tok.vocab.index(w) for w in ("a", "dress", "coat"))
  np.testing.assert_array_equal(ids[0], [2, a, dress, 3, 0, 0])
  np.testing.assert_array_equal(ids[1], [2, a, 1, a, coat, 3])  # "hat" -> [UNK]
  np.testing.assert_array_equal(ids[2], [2, 3, 0, 0, 0, 0])  # the null prompt ""
  np.testing.assert_array_equal(mask, ids != 0)
  assert tok.decode(ids[0]) == "a dress" and tok.decode(ids[1]) == "a [UNK] a coat"
  assert tok.decode(ids[2]) == conditioning.NULL_PROMPT
  # Truncation keeps [BOS] ... [EOS] within max_length.
  short, short_mask = tok.encode(["a photo of a dress"], max_length=4)
  np.testing.assert_array_equal(short[0], [2, a, tok.vocab.index("photo"), 3])
  assert short_mask.all()
  with pytest.raises(UserError):
    tok.encode(["a"], max_length=1)
  with pytest.raises(UserError):
    tok.encode("a dress", max_length=4)


def test_json_round_trip():
  tok = Tokenizer.from_captions(CAPTIONS, max_vocab=9)
  back = Tokenizer.from_json(tok.to_json())
  assert back == tok and back.vocab_size == 9
  ids, _ = tok.encode(CAPTIONS, 8)
  np.testing.assert_array_equal(back.encode(CAPTIONS, 8)[0], ids)
  with pytest.raises(UserError):
    Tokenizer.from_json('{"vocab": ["a"]}')
  with pytest.raises(UserError):
    Tokenizer.from_json("not json")


def test_text_encoder_shapes_and_padding_independence():
  tok = Tokenizer.from_captions(CAPTIONS)
  model = TextEncoder(vocab_size=tok.vocab_size, max_length=10, width=16, depth=2, num_heads=4,
                      dropout=0.1)
  ids, mask = tok.encode(["a photo of a dress", "a coat", ""], max_length=10)
  params = _jit(lambda i, m: model.init(jax.random.key(0), i, m))(ids, mask)
  apply = _jit(lambda i, m: model.apply(params, i, m))
  out = apply(ids, mask)
  assert out.shape == (3, 10, 16) and out.dtype == jnp.float32
  # Garbage in the padded positions does not reach the real tokens' outputs.
  noisy = np.where(mask, ids, np.random.default_rng(0).integers(4, tok.vocab_size, ids.shape))
  out_noisy = apply(jnp.asarray(noisy, jnp.int32), mask)
  np.testing.assert_allclose(np.asarray(out_noisy)[mask], np.asarray(out)[mask], atol=1e-5)
  assert float(jnp.abs(out_noisy - out).max()) > 1e-3  # ...while padded outputs do change
  # A shorter padding length gives the same outputs at the real tokens.
  ids8, mask8 = tok.encode(["a photo of a dress", "a coat", ""], max_length=8)
  out8 = _jit(lambda i, m: model.apply(params, i, m))(ids8, mask8)
  np.testing.assert_allclose(np.asarray(out8)[mask8], np.asarray(out)[:, :8][mask8], atol=1e-5)
  # Dropout is active only in training.
  train = model.apply(params, ids, mask, train=True, rngs={"dropout": jax.random.key(1)})
  assert float(jnp.abs(train - out).max()) > 1e-3
  with pytest.raises(UserError, match="max_length"):
    model.apply(params, jnp.zeros((1, 11), jnp.int32))


def test_text_encoder_bfloat16_keeps_float32_params():
  model = TextEncoder(vocab_size=12, max_length=6, width=8, depth=1, num_heads=2,
                      dtype=jnp.bfloat16)
  ids = jnp.array([[2, 5, 3, 0, 0, 0]], jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(lambda v: model.apply(v, ids), variables)
  assert out.shape == (1, 6, 8) and out.dtype == jnp.bfloat16


def test_fashion_mnist_captions_are_deterministic():
  names = ["T-shirt/top", "Trouser", "Ankle boot"]
  labels = np.array([0, 1, 2, 2, 1, 0, 2, 2])
  caps = conditioning.fashion_mnist_captions(labels, names, np.random.default_rng(7))
  assert caps == conditioning.fashion_mnist_captions(labels, names, np.random.default_rng(7))
  assert len(caps) == 8 and all(isinstance(c, str) for c in caps)
  for caption, label in zip(caps, labels):
    assert names[label].lower() in caption
  boots = conditioning.fashion_mnist_captions([2] * 50, names, np.random.default_rng(0))
  assert "a photo of an ankle boot" in boots and not any("a ankle" in c for c in boots)
  all_templates = conditioning.fashion_mnist_captions(
      np.zeros(200, int), ["Bag"], np.random.default_rng(0))
  assert set(all_templates) == {t.format(a="a", name="bag")
                                for t in conditioning.CAPTION_TEMPLATES}
  with pytest.raises(UserError):
    conditioning.fashion_mnist_captions([3], names, np.random.default_rng(0))
  # Captions tokenize without unknown words when the vocabulary is built from them.
  tok = Tokenizer.from_captions(caps)
  ids, _ = tok.encode(caps, 12)
  assert not (ids == conditioning.UNK).any()
