"""Test setup: 8 fake CPU devices so sharding code runs everywhere (set before jax is imported)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache per test session, inherited by the train.py / sample.py
# subprocesses: a restarted or repeated command loads its programs instead of compiling them
# again (the suite launches the same programs several times).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ldm_jax_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

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
