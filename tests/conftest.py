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


@pytest.fixture
def one_torch_thread():
  """Tiny torch reference models: torch's thread pool only adds contention on a shared CPU
  (up to 10x slower). Parity test files use it with pytest.mark.usefixtures."""
  torch = pytest.importorskip("torch", exc_type=ImportError)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)
