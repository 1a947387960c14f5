"""benchmarks/compare_sweep.py's pieces: the nearest-training-image distance against brute
force, and the coordinate search over sampling settings (each axis in turn, the others at the
best so far, lowest Frechet distance wins)."""
import argparse

import numpy as np

from benchmarks import compare_sweep


def test_nearest_matches_brute_force():
  rng = np.random.default_rng(0)
  bank = rng.uniform(-1, 1, (257, 4, 4, 1)).astype(np.float32)
  queries = np.concatenate([bank[[5, 200]] + 0.01, rng.uniform(-1, 1, (6, 4, 4, 1))])
  rms, idx = compare_sweep.nearest(queries.astype(np.float32), bank, chunk=100)
  d2 = ((queries.reshape(8, 1, -1) - bank.reshape(1, 257, -1)) ** 2).mean(-1)
  np.testing.assert_array_equal(idx, d2.argmin(1))
  np.testing.assert_allclose(rms, np.sqrt(d2.min(1)), rtol=1e-4, atol=1e-5)
  assert idx[0] == 5 and idx[1] == 200 and rms[0] < 0.02


def test_coordinate_sweep_takes_the_best_of_each_axis_in_turn(monkeypatch):
  # FD is lowest at guidance 3 with static thresholding; each new setting is scored once.
  fd = {(1.5, "static"): 9.0, (3.0, "static"): 4.0, (5.0, "static"): 6.0,
        (3.0, "dynamic"): 5.0, (1.5, "dynamic"): 1.0}
  calls = []

  def fake_score(pipe, judge, feats, per_class, setting, args):
    calls.append(dict(setting))
    return {**setting, "frechet_distance": fd[(setting["guidance"], setting["thresholding"])],
            "class_accuracy": 0.5}, None, None

  monkeypatch.setattr(compare_sweep, "score", fake_score)
  best, rows = compare_sweep.coordinate_sweep(
      None, None, None, {"guidance": 3.0, "thresholding": "static"},
      {"guidance": [1.5, 3.0, 5.0], "thresholding": ["static", "dynamic"]},
      argparse.Namespace(sweep_per_class=1), "pixel")
  # (1.5, dynamic) would be better, but a coordinate search does not go back to guidance.
  assert best == {"guidance": 3.0, "thresholding": "static"}
  assert [(c["guidance"], c["thresholding"]) for c in calls] == [
      (1.5, "static"), (3.0, "static"), (5.0, "static"), (3.0, "dynamic")]
  assert len(rows) == 4
