"""Flax LPIPS vs a plain-PyTorch LPIPS-VGG v0.1 (the `lpips` package's layout and math).

The torch reference is rebuilt here (no torchvision / lpips needed) with random, seeded
weights; its state_dict goes through the real converter (CLI and `convert_state_dict`).
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.errors import UserError
from ldm_jax.losses import lpips

torch = pytest.importorskip("torch", reason="PyTorch is the LPIPS reference (pip install "
                            "'ldm_jax[parity]')")
from torch import nn  # noqa: E402  pylint: disable=g-import-not-at-top

from ldm_jax.convert import lpips_torch  # noqa: E402  pylint: disable=g-import-not-at-top

MAX_REL_ERR = 1e-4
# torchvision vgg16 `features` config and the lpips package's slice boundaries.
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
CHNS = [64, 128, 256, 512, 512]


def vgg16_features():
  layers, c_in = [], 3
  for v in VGG_CFG:
    if v == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      c_in = v
  return nn.Sequential(*layers)


class ScalingLayer(nn.Module):

  def __init__(self):
    super().__init__()
    self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

  def forward(self, inp):
    return (inp - self.shift) / self.scale


class Vgg16Slices(nn.Module):
  """lpips.pretrained_networks.vgg16: features split into slice1..slice5 (original indices)."""

  def __init__(self, features):
    super().__init__()
    for s, (a, b) in enumerate(SLICES, 1):
      seq = nn.Sequential()
      for i in range(a, b):
        seq.add_module(str(i), features[i])
      setattr(self, f"slice{s}", seq)

  def forward(self, x):
    outs = []
    for s in range(1, 6):
      x = getattr(self, f"slice{s}")(x)
      outs.append(x)
    return outs


class NetLinLayer(nn.Module):

  def __init__(self, chn_in):
    super().__init__()
    self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, stride=1, padding=0,
                                                       bias=False))


class TorchLPIPS(nn.Module):
  """lpips.LPIPS(net='vgg', version='0.1', spatial=False) forward."""

  def __init__(self, features):
    super().__init__()
    self.scaling_layer = ScalingLayer()
    self.net = Vgg16Slices(features)
    for k, c in enumerate(CHNS):
      setattr(self, f"lin{k}", NetLinLayer(c))

  def forward(self, in0, in1):
    outs0 = self.net(self.scaling_layer(in0))
    outs1 = self.net(self.scaling_layer(in1))
    val = 0
    for k in range(len(CHNS)):
      f0 = outs0[k] / (torch.sqrt(torch.sum(outs0[k]**2, dim=1, keepdim=True)) + 1e-10)
      f1 = outs1[k] / (torch.sqrt(torch.sum(outs1[k]**2, dim=1, keepdim=True)) + 1e-10)
      d = getattr(self, f"lin{k}").model((f0 - f1)**2)
      val = val + d.mean([2, 3], keepdim=True)
    return val  # [B, 1, 1, 1]


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  features = vgg16_features()
  for m in features:
    if isinstance(m, nn.Conv2d):  # He init keeps the signal alive through all 13 convs
      nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
      nn.init.uniform_(m.bias, -0.05, 0.05)
  model = TorchLPIPS(features).eval()
  for k in range(len(CHNS)):  # the real lin weights are non-negative
    nn.init.uniform_(getattr(model, f"lin{k}").model[1].weight, 0.0, 0.5)
  return model, features


@pytest.fixture(scope="module")
def npz_path(torch_model, tmp_path_factory):
  """torch state_dict -> .pth -> converter CLI -> lpips_vgg.npz."""
  d = tmp_path_factory.mktemp("lpips")
  torch.save(torch_model[0].state_dict(), d / "lpips_full.pth")
  assert lpips_torch.main([f"--state_dict={d / 'lpips_full.pth'}",
                           f"--out={d / 'lpips_vgg.npz'}"]) == 0
  return d / "lpips_vgg.npz"


def _inputs(channels, seed, size=64):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (2, size, size, channels)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  y[1] = rng.uniform(-1, 1, y[1].shape)  # one similar pair, one unrelated pair
  return x, y


def _torch_ref(model, x, y):
  tx, ty = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x, y))
  if tx.shape[1] == 1:
    tx, ty = tx.repeat(1, 3, 1, 1), ty.repeat(1, 3, 1, 1)
  with torch.no_grad():
    return model(tx, ty).reshape(-1).numpy()


@pytest.mark.parametrize("channels", [3, 1])
def test_matches_torch_reference(torch_model, npz_path, channels):
  x, y = _inputs(channels, seed=channels)
  ref = _torch_ref(torch_model[0], x, y)
  if channels == 3:  # both entry points: closure over the params, and params as an argument
    ours = np.asarray(jax.jit(lpips.make_lpips_fn(npz_path))(x, y))
  else:
    ours = np.asarray(jax.jit(lpips.lpips_distance)(lpips.load_lpips_params(npz_path), x, y))
  assert ours.shape == (2,) and ours.dtype == np.float32
  rel = np.max(np.abs(ours - ref) / np.abs(ref))
  print(f"LPIPS C={channels}: ours {ours}, torch {ref}, max rel err {rel:.2e}")
  assert rel <= MAX_REL_ERR


def test_vgg_plus_lin_files_convert_like_the_full_state_dict(torch_model, npz_path, tmp_path):
  model, features = torch_model
  torch.save(features.state_dict(), tmp_path / "vgg16_features.pth")
  lin_sd = {k: v for k, v in model.state_dict().items() if k.startswith("lin")}
  torch.save(lin_sd, tmp_path / "vgg.pth")
  out = tmp_path / "split.npz"
  assert lpips_torch.main([f"--vgg={tmp_path / 'vgg16_features.pth'}",
                           f"--lin={tmp_path / 'vgg.pth'}", f"--out={out}"]) == 0
  a, b = lpips.load_lpips_params(out), lpips.load_lpips_params(npz_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  # OIHW -> HWIO, checked on one conv and one lin layer.
  w = getattr(model.net.slice3, "12").weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(a["vgg"]["conv3_2"]["kernel"]),
                                w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(a["lin4"]["kernel"]).reshape(-1),
                                model.lin4.model[1].weight.detach().numpy().reshape(-1))


def test_identical_inputs_give_zero_and_finite_gradients(npz_path):
  fn = lpips.make_lpips_fn(npz_path)
  x, y = (jnp.asarray(a) for a in _inputs(3, seed=7, size=32))
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(x, x)), 0.0)
  grad = jax.jit(jax.grad(lambda a, b: jnp.sum(fn(a, b))))
  for g in (grad(x, y), grad(x, x)):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.any(np.asarray(grad(x, y)) != 0)


def test_bfloat16_compute_is_close(npz_path):
  x, y = (jnp.asarray(a) for a in _inputs(3, seed=3, size=32))
  full = np.asarray(lpips.make_lpips_fn(npz_path)(x, y))
  half = np.asarray(jax.jit(lpips.make_lpips_fn(npz_path, dtype=jnp.bfloat16))(x, y))
  assert half.dtype == np.float32
  np.testing.assert_allclose(half, full, rtol=0.1)


def _full_numpy_sd(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_convert_lists_unknown_and_missing_keys(torch_model):
  sd = _full_numpy_sd(torch_model[0])
  del sd["lin3.model.1.weight"], sd["net.slice2.7.bias"]
  sd["net.slice6.30.weight"] = np.zeros(1)
  with pytest.raises(UserError) as e:
    lpips_torch.convert_state_dict(sd)
  msg = str(e.value)
  for key in ("lin3.model.1.weight", "net.slice2.7.bias", "net.slice6.30.weight"):
    assert key in msg
  assert "\n" not in msg


def test_convert_rejects_other_scaling_constants(torch_model):
  sd = _full_numpy_sd(torch_model[0])
  sd["scaling_layer.scale"] = np.ones((1, 3, 1, 1), np.float32)
  with pytest.raises(UserError, match="scaling_layer.scale"):
    lpips_torch.convert_state_dict(sd)


def test_vgg_file_with_unknown_keys_is_rejected(torch_model):
  vgg = {k: v.numpy() for k, v in torch_model[1].state_dict().items()}
  vgg["3.weight"] = np.zeros(1)  # index 3 is a ReLU
  with pytest.raises(UserError, match=r"3\.weight"):
    lpips_torch.merge_vgg_and_lin(vgg, {})


def test_missing_weights_file_names_the_path(tmp_path):
  path = str(tmp_path / "nowhere" / "lpips_vgg.npz")
  with pytest.raises(UserError, match="nowhere/lpips_vgg.npz"):
    lpips.load_lpips_params(path)
  with pytest.raises(UserError, match="nowhere/lpips_vgg.npz"):
    lpips.make_lpips_fn(path)
  with pytest.raises(UserError, match="nowhere/x.pth"):
    lpips_torch.load_torch_state_dict(str(tmp_path / "nowhere" / "x.pth"))


def test_npz_with_wrong_keys_or_shapes_is_rejected(npz_path, tmp_path):
  with np.load(npz_path) as data:
    flat = {k: data[k] for k in data.files}
  bad_keys = dict(flat, extra=np.zeros(1))
  del bad_keys["lin0/kernel"]
  np.savez(tmp_path / "keys.npz", **bad_keys)
  with pytest.raises(UserError, match=r"lin0/kernel.*extra"):
    lpips.load_lpips_params(tmp_path / "keys.npz")
  np.savez(tmp_path / "shapes.npz", **dict(flat, **{"vgg/conv1_1/bias": np.zeros(3)}))
  with pytest.raises(UserError, match=r"vgg/conv1_1/bias: \(3,\) != \(64,\)"):
    lpips.load_lpips_params(tmp_path / "shapes.npz")


def test_cli_runs_as_module_and_reports_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ldm_jax.convert.lpips_torch", f"--vgg={tmp_path / 'v.pth'}",
       f"--lin={tmp_path / 'l.pth'}", f"--out={tmp_path / 'o.npz'}"],
      capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().count("\n") == 0 and "v.pth" in proc.stderr
  assert not (tmp_path / "o.npz").exists()
