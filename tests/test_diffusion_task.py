"""The stage-2 step on its own: text conditioning end to end, condition dropout."""

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import CLASS_NAMES
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.conditioning import Tokenizer, fashion_mnist_captions
from ldm_jax.models.codecs import LatentCodec
from ldm_jax.train.diffusion_task import DiffusionTask, drop_condition
from ldm_jax.train.diffusion_stage import (caption_vocabulary, sample_prompts, training_captions,
                                     with_captions)

from configs import ldm as ldm_configs


def test_drop_condition_replaces_dropped_examples_only():
  cond = {"labels": jnp.array([1, 2, 3]), "tokens": jnp.array([[5, 6], [7, 8], [9, 9]])}
  null = {"labels": jnp.array([10]), "tokens": jnp.array([[2, 3]])}
  out = drop_condition(cond, null, jnp.array([True, False, True]))
  np.testing.assert_array_equal(out["labels"], [1, 10, 3])
  np.testing.assert_array_equal(out["tokens"], [[5, 6], [2, 3], [9, 9]])


def test_text_conditioned_step_trains_the_text_encoder():
  config = ldm_configs.get_config("text")
  config.ldm.unet.update(model_channels=16, num_res_blocks=1, attention_levels=(1,),
                         num_head_channels=8, num_groups=8)
  config.ldm.conditioning.update(text_width=16, text_depth=1, text_heads=2, drop_prob=0.5)
  config.ldm.optim.warmup_steps = 1
  ae = AutoencoderKL(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, in_channels=1, num_groups=8)
  ae_params = ae.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
  tok = Tokenizer.from_captions(caption_vocabulary(CLASS_NAMES))
  task = DiffusionTask(config, "ldm", LatentCodec(ae, 1.0, 32), 10, tok, codec_params=ae_params)
  state = jax.jit(task.init_state)(jax.random.key(0))
  assert set(state.params) == {"unet", "text"}
  labels = np.arange(8) % 10
  ids, mask = tok.encode(fashion_mnist_captions(labels, CLASS_NAMES, np.random.default_rng(0)),
                         config.ldm.conditioning.max_length)
  batch = {"image": np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 1)).astype(np.float32),
           "label": labels.astype(np.int32), "tokens": ids, "token_mask": mask}
  step = jax.jit(task.make_train_step())
  # The UNet's output conv and the transformers' output projections start at zero and the
  # first update is at lr 0 (warm-up), so the text encoder first moves on the fourth update.
  new = state
  for _ in range(5):
    new, metrics = step(new, batch, jax.random.key(1), ae_params)
    assert np.isfinite(float(metrics.compute()["loss"]))
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params["text"],
                       new.params["text"])
  assert max(jax.tree.leaves(moved)) > 0  # trained jointly with the UNet
  assert task.batch_keys()["tokens"][0] == (config.ldm.conditioning.max_length,)


def test_caption_files_drive_the_tokenizer_and_the_batches():
  class Captioned:  # a source with per-image captions, as a folder with caption files
    captions = ["a red bird", "", "a red car on a road"]
  captions = training_captions(Captioned(), [])
  tok = Tokenizer.from_captions(captions)
  assert {"bird", "car", "road"} <= set(tok.vocab)
  assert sample_prompts(captions, 5) == ["a red bird", "a red car on a road"] * 2 + [
      "a red bird"]
  batch = {"image": np.zeros((2, 4, 4, 1), np.float32), "label": np.zeros(2, np.int32),
           "caption": np.asarray(["a red car on a road", ""], dtype=object)}
  out = next(with_captions(lambda start: iter([batch]), tok, [], 6, seed=0)(0))
  assert "caption" not in out  # strings never reach the device
  ids, mask = tok.encode(["a red car on a road", ""], 6)
  np.testing.assert_array_equal(out["tokens"], ids)
  np.testing.assert_array_equal(out["token_mask"], mask)
  # Without caption files: templates over the class names, the same for the same step.
  assert training_captions(object(), CLASS_NAMES) == caption_vocabulary(CLASS_NAMES)
  plain = {k: v for k, v in batch.items() if k != "caption"}
  fm_tok = Tokenizer.from_captions(caption_vocabulary(CLASS_NAMES))
  a = next(with_captions(lambda start: iter([plain]), fm_tok, CLASS_NAMES, 8, seed=0)(3))
  b = next(with_captions(lambda start: iter([plain]), fm_tok, CLASS_NAMES, 8, seed=0)(3))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
