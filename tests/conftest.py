"""Test setup: 8 fake CPU devices so sharding code runs everywhere (set before jax is imported)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ldm_jax import platform  # noqa: E402

platform.configure()

import pathlib  # noqa: E402

import pytest  # noqa: E402

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS data dir per test session, so Fashion-MNIST is prepared at most once."""
  return tmp_path_factory.mktemp("tfds")
