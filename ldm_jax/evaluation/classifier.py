"""A small Fashion-MNIST classifier that judges generated samples (class accuracy per
guidance scale): trained on the training split, its own test accuracy reported beside it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import data as data_lib


class SmallCNN(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for ch in (32, 64, 128):
      x = nn.relu(nn.Conv(ch, (3, 3))(x))
      x = nn.relu(nn.Conv(ch, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def _images(source, image_size, channels):
  stream = data_lib.eval_batches(source, global_batch=1000, image_size=image_size,
                                 channels=channels)
  parts = [(b["image"][b["mask"] > 0], b["label"][b["mask"] > 0]) for b in stream]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def train_classifier(data_cfg, *, epochs: int = 2, batch_size: int = 128, seed: int = 0):
  """Returns (predict_fn(images [-1,1] NHWC) -> labels, test accuracy)."""
  train_x, train_y = _images(data_lib.make_source(data_cfg, data_cfg.train_split),
                             data_cfg.image_size, data_cfg.channels)
  test_x, test_y = _images(data_lib.make_source(data_cfg, data_cfg.eval_split),
                           data_cfg.image_size, data_cfg.channels)
  model = SmallCNN(int(train_y.max()) + 1)
  params = model.init(jax.random.key(seed), train_x[:1])["params"]
  steps = epochs * (len(train_x) // batch_size)
  tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                             y).mean()
    g = jax.grad(loss)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(train_x))
    for i in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[i:i + batch_size]
      params, opt = step(params, opt, train_x[idx], train_y[idx])
  logits = jax.jit(lambda x: model.apply({"params": params}, x))

  def predict(images):
    images = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(logits(images[i:i + 1000])).argmax(-1)
                           for i in range(0, len(images), 1000)])

  accuracy = float((predict(test_x) == test_y).mean())
  return predict, accuracy
