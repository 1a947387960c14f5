"""Image grids a person can see: small images enlarged by an integer factor (nearest), rows
labelled in a margin."""
import numpy as np

from ldm_jax.images import make_grid


def test_small_images_are_enlarged_to_the_minimum_width_pixel_for_pixel():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
  grid = make_grid(images, ncols=3, pad=2)
  factor = 7  # smallest k with 3 * 28 * k >= 512
  assert grid.shape == (2 * (28 * factor + 2) + 2, 3 * (28 * factor + 2) + 2, 1)
  tile = grid[2:2 + 28 * factor, 2:2 + 28 * factor, 0]
  np.testing.assert_array_equal(tile[::factor, ::factor], images[0, ..., 0])
  np.testing.assert_array_equal(tile, np.kron(images[0, ..., 0], np.ones((factor, factor))))
  # Large enough already, or asked not to: unchanged size.
  assert make_grid(images, ncols=3, min_width=0).shape == (62, 92, 1)
  big = rng.integers(0, 256, (2, 300, 300, 3), dtype=np.uint8)
  assert make_grid(big, ncols=2).shape == (304, 606, 3)


def test_row_labels_add_a_margin_with_text_beside_each_row():
  images = np.zeros((4, 32, 32, 3), np.uint8)
  plain = make_grid(images, ncols=2)
  labelled = make_grid(images, ncols=2, row_labels=["Trouser", "Ankle boot"])
  assert labelled.shape[0] == plain.shape[0] and labelled.shape[1] > plain.shape[1]
  margin = labelled[:, : labelled.shape[1] - plain.shape[1]]
  np.testing.assert_array_equal(labelled[:, margin.shape[1]:], plain)
  h = (plain.shape[0] - 2) // 2
  row_ink = [(margin[2 + r * h: (r + 1) * h] < 128).sum() for r in range(2)]
  assert all(ink > 20 for ink in row_ink), row_ink  # text drawn in each row's band
  assert row_ink[1] > row_ink[0]  # "Ankle boot" is longer than "Trouser"
