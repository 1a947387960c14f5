"""Process-wide XLA settings, in one place. Call `configure()` before the first jax computation.

On XLA:CPU, jaxlib 0.10 hands every convolution to YNNPACK, whose 3x3 weight gradient runs at
about 5 GFLOP/s; routing convolutions back to XLA's Eigen path made a Flax UNet train step
2-3x faster on 2 cores with identical gradients (measured 2026-11-25, see docs/BENCHMARKS.md).
YNNPACK stays on for reductions (GroupNorm). The flag only affects the CPU compiler, and XLA
aborts on flags it does not know, so it is applied only to the jaxlib releases it was measured
on: re-measure on every jaxlib upgrade and extend `_MEASURED`.
"""
import importlib.metadata
import os

_CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_MEASURED = ("0.10.",)


def configure() -> None:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if version.startswith(_MEASURED) and "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_CONV_FLAG}".strip()


def quiet_library_logs() -> None:
  """Drops orbax's per-save INFO chatter from the absl log (warnings and errors still show),
  so that training progress stays readable."""
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  class _Filter(logging.Filter):

    def filter(self, record):
      return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname

  absl_logging.get_absl_handler().addFilter(_Filter())


def run_once_compiler_options() -> dict:
  """Compiler options for programs that run once (state initialisation): on XLA:CPU the
  threefry-heavy init of even a tiny model took 50-100 s to compile at the default backend
  optimisation level and 10 s at level 0 (measured 2026-11-25, 2 loaded cores); its run time
  does not matter. Other backends keep their defaults."""
  import jax  # pylint: disable=g-import-not-at-top
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
