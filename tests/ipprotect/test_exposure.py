"""Tests for the IP exposure metrics: VGG loader and layer mapping, stand-ins, the zoo G, the harmonic mean."""

import functools
import math

import jax
import numpy as np
import pytest

from jipguard import data
from jipguard.ipprotect import exposure, vgg

# ---------------------------------------------------------------------------------------------
# VGG: layer names, torchvision / Keras mapping, the loader.


def test_layer_maps_match_torchvision_and_keras_numbering():
  assert vgg.vgg_layer_names("vgg16")[-1] == "conv5_1" and len(vgg.vgg_layer_names("vgg16")) == 11
  assert len(vgg.vgg_layer_names("vgg19")) == 13
  tv16 = vgg.torchvision_layer_map("vgg16")
  # torchvision's vgg16.features: conv at 0 2 | 5 7 | 10 12 14 | 17 19 21 | 24 ...
  assert [int(v.split(".")[1]) for v in tv16.values()] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24]
  assert vgg.torchvision_layer_map("vgg19")["conv5_1"] == "features.28"
  assert vgg.keras_layer_map("vgg19")["conv4_4"] == "block4_conv4"
  with pytest.raises(ValueError, match="unknown VGG"):
    vgg.vgg_layer_names("vgg11")
  with pytest.raises(ValueError, match="no layer"):
    vgg.vgg_layer_names("vgg16", "conv5_4")


def _torch_vgg(arch):
  torch = pytest.importorskip("torch")
  layers, c = [], 3
  for n, width in zip(vgg.VGG_BLOCKS[arch], vgg.VGG_WIDTHS):
    for _ in range(n):
      layers += [torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.ReLU()]
      c = width
    layers.append(torch.nn.MaxPool2d(2, 2))
  net = torch.nn.Module()
  net.features = torch.nn.Sequential(*layers)
  net.classifier = torch.nn.Linear(8, 2)  # Present in torchvision's state dict; the converter ignores it.
  return net


def test_torchvision_state_dict_converts_and_loader_maps_every_layer(tmp_path):
  """A randomly initialised torchvision-structured VGG16 gives the same conv5_1 features in Flax."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  net = _torch_vgg("vgg16")
  pth, out = str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg16.npz")
  torch.save(net.state_dict(), pth)
  w = vgg.convert("vgg16", out, torch_path=pth)
  assert (w.arch, w.preprocessing) == ("vgg16", "torch")
  assert list(w.params) == vgg.vgg_layer_names("vgg16")
  for name, prefix in vgg.torchvision_layer_map("vgg16").items():
    np.testing.assert_array_equal(w.params[name]["bias"], net.state_dict()[f"{prefix}.bias"].numpy())
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ours = np.asarray(vgg.VGGFeatures("vgg16").apply({"params": w.params}, x))
  with torch.no_grad():  # features[:26] = up to conv5_1 and its ReLU.
    ref = net.features[:26](torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  assert ours.shape == ref.shape == (2, 2, 2, 512)
  assert np.abs(ref).max() > 0
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _reference_features_nchw(state_dict, arch, x_nchw, last_index):
  """torchvision's ``features[:last_index]`` evaluated directly on OIHW weights in NCHW (no torch)."""
  import jax.numpy as jnp

  x, index = jnp.asarray(x_nchw), 0
  for n in vgg.VGG_BLOCKS[arch]:
    for _ in range(n):
      w, b = state_dict[f"features.{index}.weight"], state_dict[f"features.{index}.bias"]
      x = jax.lax.conv_general_dilated(
        x, jnp.asarray(w), (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
      ) + b.reshape(1, -1, 1, 1)
      x = jnp.maximum(x, 0)  # features[index + 1]: ReLU.
      index += 2
      if index >= last_index:
        return np.asarray(x)
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    index += 1


@pytest.mark.parametrize("arch,last_index", [("vgg16", 26), ("vgg19", 30)])
def test_state_dict_layer_mapping_without_torch(arch, last_index):
  """A torchvision-keyed OIHW state dict converts to Flax features equal to a direct NCHW evaluation."""
  rng = np.random.default_rng(0)
  sd, index, c = {"classifier.0.weight": np.zeros((4, 4))}, 0, 3
  for n, width in zip(vgg.VGG_BLOCKS[arch], vgg.VGG_WIDTHS):
    for _ in range(n):
      sd[f"features.{index}.weight"] = (rng.standard_normal((width, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32)
      sd[f"features.{index}.bias"] = (0.1 * rng.standard_normal(width)).astype(np.float32)
      index, c = index + 2, width
    index += 1
  params = vgg.convert_torch_state_dict(sd, arch)
  assert list(params) == vgg.vgg_layer_names(arch)
  x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  ours = np.asarray(vgg.VGGFeatures(arch).apply({"params": params}, x))
  ref = _reference_features_nchw(sd, arch, x.transpose(0, 3, 1, 2), last_index).transpose(0, 2, 3, 1)
  assert ours.shape == ref.shape == (2, 1, 1, 512) and np.abs(ref).max() > 0
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_converter_rejects_batch_norm_and_wrong_shapes():
  conv = vgg
  with pytest.raises(ValueError, match="batch-norm"):
    conv.convert_torch_state_dict({"features.1.running_mean": np.zeros(64)}, "vgg16")
  sd = {"features.0.weight": np.zeros((64, 1, 3, 3)), "features.0.bias": np.zeros(64)}
  with pytest.raises(ValueError, match="do not fit"):
    conv.convert_torch_state_dict(sd, "vgg16")
  with pytest.raises(ValueError, match="features.2.weight"):
    conv.convert_torch_state_dict({"features.0.weight": np.zeros((64, 3, 3, 3)), "features.0.bias": np.zeros(64)})


def test_keras_h5_converts(tmp_path):
  h5py = pytest.importorskip("h5py")
  params = vgg.random_vgg_params(0, "vgg16")
  path = str(tmp_path / "vgg16_notop.h5")
  with h5py.File(path, "w") as f:  # Keras 2 weight-file layout: one group per layer.
    for name, layer in vgg.keras_layer_map("vgg16").items():
      g = f.create_group(layer).create_group(layer)
      g["kernel:0"], g["bias:0"] = params[name]["kernel"], params[name]["bias"]
  out = str(tmp_path / "k.npz")
  w = vgg.convert("vgg16", out, keras_path=path)
  assert w.preprocessing == "caffe"
  for name in params:
    np.testing.assert_array_equal(w.params[name]["kernel"], params[name]["kernel"])


def test_loader_errors_and_deeper_layers(tmp_path):
  full = vgg.random_vgg_params(1, "vgg16", "conv5_3")
  flax_shapes = jax.eval_shape(
    vgg.VGGFeatures("vgg16", "conv5_3").init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
  )["params"]
  assert jax.tree.map(np.shape, full) == jax.tree.map(lambda s: s.shape, flax_shapes)
  path = str(tmp_path / "w.npz")
  vgg.save_vgg_weights(path, "vgg16", "torch", full)
  w = vgg.load_vgg_weights(path)
  assert set(w.ignored) == {"conv5_2/kernel", "conv5_2/bias", "conv5_3/kernel", "conv5_3/bias"}
  assert set(w.params) == set(vgg.vgg_layer_names("vgg16"))

  def broken(edit, match):
    p = {k: dict(v) for k, v in full.items()}
    edit(p)
    vgg.save_vgg_weights(path, "vgg16", "torch", p)
    with pytest.raises(ValueError, match=match):
      vgg.load_vgg_weights(path)

  broken(lambda p: p.pop("conv3_2"), "missing conv3_2/kernel")
  broken(lambda p: p["conv1_1"].update(kernel=np.zeros((3, 3, 1, 64))), "shape")
  broken(lambda p: p.update(fc6={"kernel": np.zeros(3)}), "unknown array 'fc6/kernel'")
  broken(lambda p: p["conv2_1"].update(bias=np.full(128, np.nan)), "non-finite")
  with pytest.raises(FileNotFoundError, match="convert_vgg_weights"):
    vgg.load_vgg_weights(str(tmp_path / "absent.npz"))
  np.savez(str(tmp_path / "raw.npz"), x=np.zeros(1))
  with pytest.raises(ValueError, match="__meta__"):
    vgg.load_vgg_weights(str(tmp_path / "raw.npz"))
  with pytest.raises(ValueError, match="preprocessing"):
    vgg.save_vgg_weights(path, "vgg16", "tf", full)


def test_vgg_perceptual_distance_and_image_exposure(tmp_path):
  params = vgg.random_vgg_params(2, "vgg16")
  path = str(tmp_path / "w.npz")
  vgg.save_vgg_weights(path, "vgg16", "torch", params)
  w = vgg.load_vgg_weights(path)
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(3, 8, 8, 1)).astype(np.float32)
  b = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
  d_same = vgg.vgg_perceptual_distance(w, a, a, size=32)
  d = vgg.vgg_perceptual_distance(w, a, b, size=32, batch_size=2)
  np.testing.assert_array_equal(d_same, 0)
  assert d.shape == (3,) and np.all(d > 0)
  e = exposure.image_exposure(a, b, vgg=w, vgg_size=32)
  assert e["vgg_conv5_1"] == pytest.approx(np.mean(1 / d), rel=1e-5)
  assert e["pixel_mse"] == pytest.approx(np.mean(1 / np.mean((a - b) ** 2, axis=(1, 2, 3))), rel=1e-5)
  assert math.isinf(exposure.image_exposure(a, a)["pixel_mse"])
  assert "vgg_conv5_1" not in exposure.image_exposure(a, b)  # Stand-ins only without weights.
  perm = np.random.default_rng(3).permutation(3)  # DP-MERF's pairing: a random sanitized image per original.
  assert not np.array_equal(perm, np.arange(3))
  shuffled = exposure.image_exposure(a, b, pair_randomly=True, seed=3)
  assert shuffled["pixel_mse"] == exposure.image_exposure(a, b[perm])["pixel_mse"] != e["pixel_mse"]
  with pytest.raises(ValueError, match="one shape"):
    exposure.image_exposure(a, b[:2])
  with pytest.raises(ValueError, match="NaN"):
    exposure.image_exposure(a, np.full_like(b, np.nan))


# ---------------------------------------------------------------------------------------------
# The 0-1 normalised harmonic mean (VI-A4).


def test_harmonic_mean_hand_computed():
  assert float(exposure.harmonic_mean(0.5, 0.25)) == pytest.approx(1 / 3)  # 2 * 0.125 / 0.75.
  assert float(exposure.harmonic_mean(0.0, 0.7)) == 0.0
  assert float(exposure.harmonic_mean(0.0, 0.0)) == 0.0
  # Table III, FMNIST image IP, IPProtect: x = 0.01 / 0.52 = 0.019231, y = 0.73 / 1.09 = 0.669725,
  # 2xy / (x + y) = 0.025759 / 0.688956 = 0.037388 (the paper prints 0.04).
  assert float(exposure.normalized_harmonic_mean(0.01, 0.73, 0.52, 1.09)) == pytest.approx(0.037388, abs=1e-6)
  hm = exposure.normalized_harmonic_mean(np.array([0.52, 0.26]), np.array([1.09, 0.545]), 0.52, 1.09)
  np.testing.assert_allclose(hm, [1.0, 0.5])
  with pytest.raises(ValueError, match="mae values"):
    exposure.normalized_harmonic_mean(0.6, 0.5, 0.52, 1.0)
  with pytest.raises(ValueError, match="exposure_max"):
    exposure.normalized_harmonic_mean(0.1, 0.5, 0.52, 0.0)
  with pytest.raises(ValueError, match="finite"):
    exposure.harmonic_mean(-1.0, 0.5)


# ---------------------------------------------------------------------------------------------
# The model zoo G and statistical exposure (Defs. 3, 4).

_ZOO = exposure.SMOKE_ZOO


@functools.cache
def _sets():
  train, test = data.load("fashion_mnist_subset", "train"), data.load("fashion_mnist_subset", "test")
  dx = train.subset(np.arange(300))
  buyer = test.subset(np.arange(150))
  return dx, buyer, exposure.fit_zoo(dx.images, dx.labels, 10, _ZOO)


def test_identity_exposes_most_and_random_is_near_chance():
  dx, buyer, dx_zoo = _sets()
  noise = np.asarray(jax.random.normal(jax.random.key(0), buyer.images.shape))
  t_id = exposure.training_exposure(buyer.images, buyer.labels, dx.images, dx.labels, 10, _ZOO)
  t_rand = exposure.training_exposure(noise, buyer.labels, dx.images, dx.labels, 10, _ZOO)
  i_id = exposure.inference_exposure(dx_zoo, buyer.images, buyer.labels)
  i_rand = exposure.inference_exposure(dx_zoo, noise, buyer.labels)
  for e in (t_id, t_rand, i_id, i_rand):
    assert list(e.per_model) == list(exposure.ZOO)
    assert all(0 <= v <= 1 for v in e.per_model.values())
  assert t_id.mean > t_rand.mean + 0.25 and i_id.mean > i_rand.mean + 0.25
  assert abs(t_rand.mean - 0.1) < 0.05 and abs(i_rand.mean - 0.1) < 0.05  # 1 / |C|.
  assert t_id.mean == pytest.approx(np.mean(list(t_id.per_model.values())))
  # The stand-in feature distance is the zoo CNN's: zero on identical images.
  e = exposure.image_exposure(buyer.images[:8], noise[:8], feature_zoo=dx_zoo)
  assert 0 < e["own_cnn_feature"] < math.inf
  np.testing.assert_array_equal(dx_zoo.feature_distance(buyer.images[:5], buyer.images[:5]), 0)


def test_zoo_edge_cases_and_errors():
  dx, buyer, _ = _sets()
  one_class = np.full(20, 3, np.int32)
  zoo = exposure.fit_zoo(buyer.images[:20], one_class, 10, _ZOO)  # Every learner: the constant class 3.
  acc = zoo.accuracies(dx.images, dx.labels)
  assert len(acc) == len(exposure.ZOO) and all(v == pytest.approx(np.mean(dx.labels == 3)) for v in acc.values())
  few = np.isin(dx.labels, [0, 5, 9])  # XGBoost needs re-indexed labels when classes are missing.
  xgb = exposure.fit_zoo(dx.images[few], dx.labels[few], 10, exposure.ZooConfig(models=("xgboost",), n_estimators=3))
  assert set(np.unique(xgb.models["xgboost"].predict(dx.images.reshape(300, -1)))) <= {0, 5, 9}
  with pytest.raises(ValueError, match="unknown zoo models"):
    exposure.ZooConfig(models=("svm",))
  with pytest.raises(ValueError, match="NaN"):
    exposure.fit_zoo(np.full((4, 28, 28, 1), np.nan, np.float32), np.arange(4), 10, _ZOO)
  with pytest.raises(ValueError, match="labels must be integers"):
    exposure.fit_zoo(buyer.images[:4], np.array([0, 1, 2, 10]), 10, _ZOO)
  with pytest.raises(ValueError, match="shape"):
    zoo.accuracies(np.zeros((2, 8, 8, 1), np.float32), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="n_jobs"):
    exposure.ZooConfig(n_jobs=0)
