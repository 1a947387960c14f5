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
import sys  # noqa: E402

import pytest  # noqa: E402


def _load_torchvision_on_cpu_torch():
  """Makes `import torchvision` work for the whole session, or leaves it absent.

  The package index offers torchvision 0.28 (the release for torch 2.13, pulled in by
  pytorch-fid, the FID reference of tests/test_inception.py) only as a CUDA build; on the CPU
  torch wheel its C++ ops do not load and the import fails registering fake kernels for two of
  them (`nms`, `qnms`). transformers and diffusers import torchvision when it is installed, so
  that failure would break every parity test. No test needs those ops: their schemas are
  declared (only when the extension is missing) and the import retried.
  """
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return
  except ImportError:
    return
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
  import torch  # pylint: disable=g-import-not-at-top
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  lib = torch.library.Library("torchvision", "DEF")
  for op in ("nms", "qnms"):
    lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _load_torchvision_on_cpu_torch.library = lib  # the schemas live as long as this object
  import torchvision  # noqa: F401,F811  pylint: disable=g-import-not-at-top,unused-import


_load_torchvision_on_cpu_torch()

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


@pytest.fixture
def run_notebook(monkeypatch):
  """Executes notebooks/sample.ipynb on a workdir with `steps` sampler steps; asserts it ran
  without errors and showed an image; returns the code cells' outputs."""
  def run(workdir, steps: int):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = pathlib.Path(__file__).parents[1]
    monkeypatch.setenv("LDM_WORKDIR", str(workdir))
    monkeypatch.setenv("LDM_NOTEBOOK_STEPS", str(steps))
    nb = nbformat.read(root / "notebooks" / "sample.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(root)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    return outputs
  return run


@pytest.fixture
def sample_cli():
  """Runs sample.py on a workdir (8 samples, DDIM, guidance 3, seed 3, `steps` steps, extra
  flags); returns the PNG's bytes."""
  def run(workdir, out, *extra, steps: int = 8):
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    root = pathlib.Path(__file__).parents[1]
    cmd = [sys.executable, str(root / "sample.py"), f"--workdir={workdir}", "--num_samples=8",
           "--sampler=ddim", f"--steps={steps}", "--guidance=3.0", "--seed=3", f"--out={out}",
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return out.read_bytes()
  return run
