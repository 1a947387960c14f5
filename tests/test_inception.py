"""The FID Inception-v3 and its converter against pytorch-fid's network (and torchvision's
`inception_v3` architecture) on random weights: no download happens here."""

import jax
import numpy as np
import pytest

from ldm_jax.convert import inception as convert_inception
from ldm_jax.errors import UserError
from ldm_jax.models import inception

torch = pytest.importorskip("torch", exc_type=ImportError)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _import_torchvision():
  """torchvision (made importable on CPU torch by tests/conftest.py), or a skip."""
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("torchvision is not installed (pip install -e .[parity])")
  return torchvision


def _randomise(model, seed: int):
  """Random conv weights (torch's init), and batch-norm statistics taken from one batch of
  random images so that every activation stays O(1) through the 94 layers; random affine."""
  torch.manual_seed(seed)
  model.train()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.momentum = 1.0  # running statistics := the next batch's
    model(torch.rand(2, 3, 299, 299) * 2 - 1)
  model.eval()
  return model


def _pool3(tv_model, x):
  """torchvision Inception3 up to the average pool (what pytorch-fid's block 3 returns)."""
  names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
           "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
           "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
           "avgpool"]
  for n in names:
    x = getattr(tv_model, n)(x)
  return x.flatten(1)


@pytest.fixture(scope="module")
def fid_reference():
  """pytorch-fid's InceptionV3 wrapper (resize to 299, [0,1] -> [-1,1], pool3) built by
  pytorch-fid itself, with random weights in place of the download."""
  tv = _import_torchvision()
  net = pytest.importorskip("pytorch_fid.inception")
  built = {}

  def fake_download(url, progress=True):
    del url, progress  # the network exactly as net.fid_inception_v3 builds it
    model = tv.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                   init_weights=False)
    for name, block in (("Mixed_5b", net.FIDInceptionA(192, 32)),
                        ("Mixed_5c", net.FIDInceptionA(256, 64)),
                        ("Mixed_5d", net.FIDInceptionA(288, 64)),
                        ("Mixed_6b", net.FIDInceptionC(768, 128)),
                        ("Mixed_6c", net.FIDInceptionC(768, 160)),
                        ("Mixed_6d", net.FIDInceptionC(768, 160)),
                        ("Mixed_6e", net.FIDInceptionC(768, 192)),
                        ("Mixed_7b", net.FIDInceptionE_1(1280)),
                        ("Mixed_7c", net.FIDInceptionE_2(2048))):
      setattr(model, name, block)
    built["state"] = _randomise(model, 0).state_dict()
    return built["state"]

  patch = pytest.MonkeyPatch()
  patch.setattr(net, "load_state_dict_from_url", fake_download)
  try:
    wrapper = net.InceptionV3([3]).eval()
  finally:
    patch.undo()
  return wrapper, {k: v.numpy() for k, v in built["state"].items()}


def _images(shape, seed):
  return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def test_fid_inception_matches_pytorch_fid_through_the_converted_file(fid_reference, tmp_path):
  wrapper, state = fid_reference
  path = tmp_path / "pt_inception.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  npz = tmp_path / "inception.npz"
  assert convert_inception.main([str(path), str(npz)]) == 0
  variables, fid_variant = convert_inception.load_variables(str(npz))
  assert fid_variant
  # 32x32 RGB and grayscale images in [0, 1], as pytorch-fid takes them (resized to 299).
  x = _images((2, 32, 32, 3), 1)
  gray = _images((1, 32, 32, 1), 2)
  with torch.no_grad():
    want = wrapper(torch.from_numpy(np.concatenate([x, gray.repeat(3, -1)]))
                   .permute(0, 3, 1, 2))[0].flatten(1).numpy()
  model = inception.InceptionV3()
  fn = jax.jit(lambda v, im: model.apply(v, inception.fid_input(im * 2 - 1)))
  got = np.concatenate([np.asarray(fn(variables, x)), np.asarray(fn(variables, gray))])
  assert got.shape == (3, inception.FEATURES)
  assert want.std() > 0.1  # informative features, not a dead network
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_torchvision_variant_matches_torchvision_inception_v3():
  tv = _import_torchvision()
  model_t = _randomise(tv.models.inception_v3(weights=None, aux_logits=True,
                                              init_weights=False), 1)
  state = {k: v.numpy() for k, v in model_t.state_dict().items()}  # with AuxLogits.*, fc.*
  variables = convert_inception.convert_state_dict(state, fid_variant=False)
  x = _images((1, 299, 299, 3), 3) * 2 - 1  # torchvision takes the network's range as it is
  with torch.no_grad():
    want = _pool3(model_t, torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(jax.jit(inception.InceptionV3(fid_variant=False).apply)(variables, x))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # The FID variant pools differently: with the same weights the features differ.
  fid = np.asarray(jax.jit(inception.InceptionV3().apply)(variables, x))
  assert np.abs(fid - want).max() > 1e-2 * np.abs(want).max()


def test_converter_refuses_wrong_state_dicts(fid_reference, tmp_path):
  _, state = fid_reference
  broken = dict(state)
  del broken["Mixed_6b.branch7x7_2.conv.weight"]
  broken["Mixed_9z.conv.weight"] = np.zeros((1,), np.float32)
  with pytest.raises(UserError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight.*Mixed_9z"):
    convert_inception.convert_state_dict(broken)
  wrong = dict(state)
  wrong["Conv2d_1a_3x3.bn.running_var"] = np.ones((33,), np.float32)
  with pytest.raises(UserError, match=r"Conv2d_1a_3x3\.bn\.running_var \(33,\)"):
    convert_inception.convert_state_dict(wrong)
  bad_npz = tmp_path / "other.npz"
  np.savez(bad_npz, something=np.zeros(3))
  with pytest.raises(UserError, match="not a converted Inception-v3"):
    convert_inception.load_variables(str(bad_npz))
  with pytest.raises(UserError, match="does not exist"):
    convert_inception.load_variables(str(tmp_path / "missing.pth"))
