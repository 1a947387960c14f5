"""A small Fashion-MNIST classifier that judges generated samples: class accuracy, and its
pooled features for a Frechet distance (FID's recipe on this classifier instead of
Inception-v3, which needs downloaded weights). Trained on the training split; its own test
accuracy is reported beside the samples' accuracy."""
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax

from ldm_jax import data as data_lib
from ldm_jax import platform


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
  its test-split accuracy, the test split itself (images, labels), and its parameters."""
  predict: Callable[[np.ndarray], np.ndarray]
  features: Callable[[np.ndarray], np.ndarray]
  test_accuracy: float
  test_images: np.ndarray
  test_labels: np.ndarray
  params: Any = None


def _images(source, image_size, channels, max_examples=None):
  stream = data_lib.eval_batches(source, global_batch=1000, image_size=image_size,
                                 channels=channels, max_examples=max_examples or None)
  parts = [(b["image"][b["mask"] > 0], b["label"][b["mask"] > 0]) for b in stream]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_split(data_cfg, max_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(images in [-1, 1] NHWC float32, labels) of the evaluation split (the first
  `max_images` when > 0)."""
  return _images(data_lib.make_source(data_cfg, data_cfg.eval_split), data_cfg.image_size,
                 data_cfg.channels, max_images)


def train_split(data_cfg, max_images: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of the training split, as `test_split` (the real-data reference of a
  Frechet distance: as many training images as there are samples)."""
  return _images(data_lib.make_source(data_cfg, data_cfg.train_split), data_cfg.image_size,
                 data_cfg.channels, max_images)


def train_classifier(data_cfg, *, epochs: int = 2, batch_size: int = 128, seed: int = 0):
  """Returns (predict_fn(images [-1,1] NHWC) -> labels, test accuracy)."""
  judge = train_judge(data_cfg, epochs=epochs, batch_size=batch_size, seed=seed)
  return judge.predict, judge.test_accuracy


def train_params(train_x: np.ndarray, train_y: np.ndarray, *, num_classes: int,
                 epochs: int = 2, batch_size: int = 128, seed: int = 0):
  """SmallCNN parameters trained with Adam (cosine decay) on the given images: same seed,
  same parameters."""
  model = SmallCNN(num_classes)
  params = jax.jit(model.init, compiler_options=platform.run_once_compiler_options())(
      jax.random.key(seed), train_x[:1])["params"]
  steps = max(epochs * (len(train_x) // batch_size), 1)
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
  return params


def judge_from_params(params, num_classes: int, test_x: np.ndarray,
                      test_y: np.ndarray) -> Judge:
  """The Judge of trained SmallCNN parameters (its accuracy measured on test_x, test_y)."""
  model = SmallCNN(num_classes)
  both = jax.jit(lambda p, x: model.apply({"params": p}, x, return_features=True))

  def run(images, index):
    images = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(both(params, images[i:i + 1000])[index])
                           for i in range(0, len(images), 1000)])

  def predict(images):
    return run(images, 0).argmax(-1)

  def features(images):
    return run(images, 1).astype(np.float64)

  accuracy = float((predict(test_x) == test_y).mean())
  return Judge(predict, features, accuracy, test_x, test_y, params)


def num_classes_of(params) -> int:
  return int(params["Dense_0"]["bias"].shape[0])


def train_judge(data_cfg, *, epochs: int = 2, batch_size: int = 128, seed: int = 0,
                max_train_images: int = 0, max_test_images: int = 0) -> Judge:
  """Trains the classifier on the training split (same seed, same classifier); the first
  `max_*_images` of each split when > 0."""
  train_x, train_y = _images(data_lib.make_source(data_cfg, data_cfg.train_split),
                             data_cfg.image_size, data_cfg.channels, max_train_images)
  test_x, test_y = test_split(data_cfg, max_test_images)
  params = train_params(train_x, train_y, num_classes=int(train_y.max()) + 1, epochs=epochs,
                        batch_size=batch_size, seed=seed)
  return judge_from_params(params, int(train_y.max()) + 1, test_x, test_y)
