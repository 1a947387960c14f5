"""The command lines: each module defines its absl flags and a `main`; the scripts at the
repository root (train.py, sample.py) and `python -m ldm_jax.evaluate` run them."""
