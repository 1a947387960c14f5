"""A small Fashion-MNIST classifier that judges generated samples: class accuracy, and its
pooled features for a Frechet distance (FID's recipe on this classifier instead of
Inception-v3, which needs downloaded weights). Trained on the training split; its own test
accuracy is reported beside the samples' accuracy."""
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax import data as data_lib


class SmallCNN(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, return_features: bool = False):
    for ch in (32, 64, 128):
      x = nn.relu(nn.Conv(ch, (3, 3))(x))
      x = nn.relu(nn.Conv(ch, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    features = x.mean(axis=(1, 2))
    logits = nn.Dense(self.num_classes)(features)
    return (logits, features) if return_features else logits


class Judge(NamedTuple):
  """A trained classifier: labels and 128-d pooled features of images in [-1, 1] (NHWC),
  its test-split accuracy, and the test split itself (images, labels)."""
  predict: Callable[[np.ndarray], np.ndarray]
  features: Callable[[np.ndarray], np.ndarray]
  test_accuracy: float
  test_images: np.ndarray
  test_labels: np.ndarray


def _images(source, image_size, channels):
  stream = data_lib.eval_batches(source, global_batch=1000, image_size=image_size,
                                 channels=channels)
  parts = [(b["image"][b["mask"] > 0], b["label"][b["mask"] > 0]) for b in stream]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def train_classifier(data_cfg, *, epochs: int = 2, batch_size: int = 128, seed: int = 0):
  """Returns (predict_fn(images [-1,1] NHWC) -> labels, test accuracy)."""
  judge = train_judge(data_cfg, epochs=epochs, batch_size=batch_size, seed=seed)
  return judge.predict, judge.test_accuracy


def train_judge(data_cfg, *, epochs: int = 2, batch_size: int = 128, seed: int = 0) -> Judge:
  """Trains the classifier on the training split (same seed, same classifier)."""
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
  both = jax.jit(lambda x: model.apply({"params": params}, x, return_features=True))

  def run(images, index):
    images = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(both(images[i:i + 1000])[index])
                           for i in range(0, len(images), 1000)])

  def predict(images):
    return run(images, 0).argmax(-1)

  def features(images):
    return run(images, 1).astype(np.float64)

  accuracy = float((predict(test_x) == test_y).mean())
  return Judge(predict, features, accuracy, test_x, test_y)
