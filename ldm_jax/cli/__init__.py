"""The command lines: each module defines its absl flags and a `main`; the scripts at the
repository root (train.py, sample.py) and `python -m ldm_jax.evaluate` run them."""


def start(argv, verbosity: int) -> None:
  """What every command does before its work: refuse stray arguments, set the XLA flags before
  jax starts, quiet the libraries' logs and set up the console at `verbosity`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ldm_jax import console, platform  # pylint: disable=g-import-not-at-top
  platform.configure()
  platform.quiet_library_logs()
  console.setup(verbosity)
