"""The VGG of the paper's image IP exposure (Def. 2): VGG16 / VGG19 up to conv5_1, its weights file.

No package ships ImageNet-pretrained VGG weights and none can be downloaded at run time, so the
user brings them: :func:`convert` reads torchvision's state dict (``.pth``) or Keras' weights
(``.h5``) and writes the ``jipguard-vgg-v1`` file (:func:`save_vgg_weights`) that
:func:`load_vgg_weights` maps onto :class:`VGGFeatures` (``scripts/convert_vgg_weights.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jipguard import models, rundir

# --------------------------------------------------------------------------------------------
# VGG up to conv5_1 (Def. 2).

# Convolutions per block; every block is followed by a 2x2 max pool (torchvision's "M").
VGG_BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
VGG_WIDTHS = (64, 128, 256, 512, 512)
# What the pretrained weights expect of their input (recorded in the weights file).
#   torch: RGB in [0, 1], minus ImageNet mean, divided by ImageNet std (torchvision).
#   caffe: BGR in [0, 255], minus the BGR ImageNet mean (Keras' VGG16/VGG19).
PREPROCESSING = ("torch", "caffe")
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
WEIGHTS_FORMAT = "jipguard-vgg-v1"


def vgg_layer_names(arch: str = "vgg16", up_to: str = "conv5_1") -> list[str]:
  """Conv layer names ``conv<block>_<i>`` of ``arch`` in order, up to and including ``up_to``."""
  if arch not in VGG_BLOCKS:
    raise ValueError(f"unknown VGG architecture {arch!r}; choose one of {sorted(VGG_BLOCKS)}")
  names = [f"conv{b + 1}_{i + 1}" for b, n in enumerate(VGG_BLOCKS[arch]) for i in range(n)]
  if up_to not in names:
    raise ValueError(f"{arch} has no layer {up_to!r}; layers are {names}")
  return names[: names.index(up_to) + 1]


def vgg_layer_shapes(arch: str = "vgg16", up_to: str = "conv5_1") -> dict[str, tuple[tuple[int, ...], tuple[int]]]:
  """Flax (kernel HWIO, bias) shapes of each conv layer up to ``up_to``."""
  out, c_in = {}, 3
  for name in vgg_layer_names(arch, up_to):
    width = VGG_WIDTHS[int(name[4]) - 1]
    out[name] = ((3, 3, c_in, width), (width,))
    c_in = width
  return out


def torchvision_layer_map(arch: str = "vgg16", up_to: str = "conv5_1") -> dict[str, str]:
  """Flax layer name -> torchvision ``state_dict`` prefix (``features.<index>``).

  torchvision's ``vgg16()`` / ``vgg19()`` (no batch norm) number ``features`` as conv, ReLU
  per conv layer and one max pool per block: conv1_1 is ``features.0``, conv2_1
  ``features.5``, conv5_1 ``features.24`` (vgg16) / ``features.28`` (vgg19).
  """
  out, index = {}, 0
  names = vgg_layer_names(arch, up_to)
  for b, n in enumerate(VGG_BLOCKS[arch]):
    for i in range(n):
      name = f"conv{b + 1}_{i + 1}"
      if name in names:
        out[name] = f"features.{index}"
      index += 2  # Conv2d, ReLU.
    index += 1  # MaxPool2d.
  return out


def keras_layer_map(arch: str = "vgg16", up_to: str = "conv5_1") -> dict[str, str]:
  """Flax layer name -> Keras layer name (``keras.applications.VGG16``: ``block<b>_conv<i>``)."""
  return {name: f"block{name[4]}_conv{name[6:]}" for name in vgg_layer_names(arch, up_to)}


class VGGFeatures(nn.Module):
  """VGG16/19 convolutional trunk up to ``layer`` (default conv5_1), in NHWC.

  3x3 convolutions with 'SAME' padding (torchvision's padding 1), ReLU, 2x2 max pools
  between blocks, exactly as torchvision's ``features``. Returns the feature map of
  ``layer``, after its ReLU if ``relu`` (the usual "conv5_1" of perceptual-loss code,
  torchvision ``features[:26]``), else the raw convolution output.

  Attributes:
    arch: ``vgg16`` or ``vgg19``.
    layer: Last layer computed, e.g. ``conv5_1``.
    relu: Apply the ReLU of ``layer``.
  """

  arch: str = "vgg16"
  layer: str = "conv5_1"
  relu: bool = True

  @nn.compact
  def __call__(self, x_BxHxWx3: jax.Array) -> jax.Array:
    x = x_BxHxWx3
    names = vgg_layer_names(self.arch, self.layer)
    for name in names:
      if name.endswith("_1") and name != "conv1_1":
        x = models.max_pool(x)
      x = nn.Conv(VGG_WIDTHS[int(name[4]) - 1], (3, 3), padding="SAME", name=name)(x)
      if name != names[-1] or self.relu:
        x = nn.relu(x)
    return x


@dataclasses.dataclass(frozen=True)
class VGGWeights:
  """A loaded weights file: ``params`` is the Flax params tree of :class:`VGGFeatures`."""

  arch: str
  preprocessing: str
  params: dict[str, dict[str, np.ndarray]]
  source: str = ""
  ignored: tuple[str, ...] = ()  # Deeper layers in the file that conv5_1 does not need.


def save_vgg_weights(
  path: str, arch: str, preprocessing: str, params: Mapping[str, Mapping[str, np.ndarray]], source: str = ""
) -> None:
  """Writes the weights file :func:`load_vgg_weights` reads (an ``.npz``, atomically).

  Format ``jipguard-vgg-v1``: arrays ``<layer>/kernel`` (float32, HWIO) and ``<layer>/bias``
  (float32, O) per conv layer ``conv<b>_<i>``, and ``__meta__``, a JSON string with
  ``format``, ``arch``, ``preprocessing`` (``torch`` or ``caffe``) and ``source``.
  """
  if preprocessing not in PREPROCESSING:
    raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
  vgg_layer_names(arch)
  arrays = {f"{layer}/{kind}": np.asarray(v, np.float32) for layer, d in params.items() for kind, v in d.items()}
  meta = json.dumps({"format": WEIGHTS_FORMAT, "arch": arch, "preprocessing": preprocessing, "source": source})
  rundir.write_atomic(path, lambda tmp: np.savez(tmp, __meta__=np.array(meta), **arrays))


def load_vgg_weights(path: str, layer: str = "conv5_1") -> VGGWeights:
  """Reads a weights file and maps it onto :class:`VGGFeatures` (up to ``layer``).

  Every layer from conv1_1 to ``layer`` must be present with exactly the shapes of the
  file's architecture; deeper layers of the same architecture are ignored (and listed);
  anything else is an error.

  Raises:
    FileNotFoundError: No file at ``path``.
    ValueError: Not a ``jipguard-vgg-v1`` file, unknown architecture or preprocessing,
      a missing, misshapen, non-finite or unknown array.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"no VGG weights file at {path}; write one with scripts/convert_vgg_weights.py (see docs/exposure.md)"
    )
  with np.load(path, allow_pickle=False) as z:
    if "__meta__" not in z:
      raise ValueError(
        f"{path}: not a jipguard VGG weights file (no __meta__); convert it with scripts/convert_vgg_weights.py"
      )
    meta = json.loads(str(z["__meta__"]))
    arrays = {k: z[k] for k in z.files if k != "__meta__"}
  if meta.get("format") != WEIGHTS_FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
  arch, prep = meta.get("arch"), meta.get("preprocessing")
  if arch not in VGG_BLOCKS or prep not in PREPROCESSING:
    raise ValueError(f"{path}: arch {arch!r} / preprocessing {prep!r} not in {sorted(VGG_BLOCKS)} / {PREPROCESSING}")
  needed = vgg_layer_shapes(arch, layer)
  deeper = set(vgg_layer_shapes(arch, vgg_layer_names(arch, f"conv5_{VGG_BLOCKS[arch][-1]}")[-1])) - set(needed)
  params, ignored = {}, []
  for key in sorted(arrays):
    name, _, kind = key.partition("/")
    if kind not in ("kernel", "bias") or (name not in needed and name not in deeper):
      raise ValueError(f"{path}: unknown array {key!r} for {arch}")
    if name in deeper:
      ignored.append(key)
  for name, (k_shape, b_shape) in needed.items():
    for kind, shape in (("kernel", k_shape), ("bias", b_shape)):
      key = f"{name}/{kind}"
      if key not in arrays:
        raise ValueError(f"{path}: missing {key} (every layer conv1_1..{layer} is needed)")
      if arrays[key].shape != shape:
        raise ValueError(f"{path}: {key} has shape {arrays[key].shape}, {arch} needs {shape} (HWIO)")
      if not np.all(np.isfinite(arrays[key])):
        raise ValueError(f"{path}: {key} has non-finite values")
    params[name] = {
      "kernel": arrays[f"{name}/kernel"].astype(np.float32),
      "bias": arrays[f"{name}/bias"].astype(np.float32),
    }
  return VGGWeights(
    arch=arch, preprocessing=prep, params=params, source=str(meta.get("source", "")), ignored=tuple(ignored)
  )


def check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
  """Two NHWC float32 image arrays of one shape, finite (ValueError otherwise)."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if a.ndim != 4 or a.shape != b.shape:
    raise ValueError(f"need two NHWC image arrays of one shape, got {a.shape} and {b.shape}")
  for name, x in (("original", a), ("sanitized", b)):
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{name} images contain NaN or infinite values")
  return a, b


def vgg_preprocess(images_NxHxWxC: jax.Array, size: int, preprocessing: str) -> jax.Array:
  """Grayscale -> 3 channels, bilinear resize to ``size`` x ``size``, the weights' normalisation.

  Pixels are used as they are (sanitized images are unbounded and are compared unclipped).
  """
  x = images_NxHxWxC
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  elif x.shape[-1] != 3:
    raise ValueError(f"VGG needs 1 or 3 channels, got {x.shape[-1]}")
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear")
  if preprocessing == "torch":
    return (x - jnp.array(_TORCH_MEAN).reshape(1, 1, 1, 3)) / jnp.array(_TORCH_STD).reshape(1, 1, 1, 3)
  if preprocessing == "caffe":
    return x[..., ::-1] * 255.0 - jnp.array(_CAFFE_MEAN_BGR).reshape(1, 1, 1, 3)
  raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")


@functools.partial(jax.jit, static_argnames=("module", "size", "preprocessing"))
def _feature_distance_vgg(params, a, b, *, module, size, preprocessing):
  fa = module.apply({"params": params}, vgg_preprocess(a, size, preprocessing))
  fb = module.apply({"params": params}, vgg_preprocess(b, size, preprocessing))
  return jnp.mean(jnp.square(fa - fb), axis=(1, 2, 3))  # ||.||^2 / (L H W).


def vgg_perceptual_distance(
  weights: VGGWeights,
  a_NxHxWxC: np.ndarray,
  b_NxHxWxC: np.ndarray,
  *,
  size: int = 224,
  layer: str = "conv5_1",
  batch_size: int = 32,
) -> np.ndarray:
  """The paper's D (perceptual loss, Johnson et al.) per image pair, shape (N,).

  ``size``: images are resized to ``size`` x ``size`` first; 224, the input size of the
  ImageNet-pretrained VGG, is what the paper implies (at 28x28 conv5_1 would be 1x1).
  """
  a, b = check_pair(a_NxHxWxC, b_NxHxWxC)
  module = VGGFeatures(weights.arch, layer)
  params = jax.device_put(weights.params)  # Once, not per batch.
  out = [
    np.asarray(
      _feature_distance_vgg(
        params,
        a[i : i + batch_size],
        b[i : i + batch_size],
        module=module,
        size=size,
        preprocessing=weights.preprocessing,
      )
    )
    for i in range(0, len(a), batch_size)
  ]
  return np.concatenate(out)


def random_vgg_params(seed: int = 0, arch: str = "vgg16", layer: str = "conv5_1") -> dict[str, Any]:
  """A randomly initialised (He-normal) params tree of :class:`VGGFeatures` (tests, same structure)."""
  rng = np.random.default_rng(seed)
  return {
    name: {
      "kernel": (rng.standard_normal(k, np.float32) * np.sqrt(2 / np.prod(k[:3]))).astype(np.float32),
      "bias": (0.01 * rng.standard_normal(b, np.float32)).astype(np.float32),
    }
    for name, (k, b) in vgg_layer_shapes(arch, layer).items()
  }


def convert_torch_state_dict(
  state_dict: Mapping[str, Any], arch: str = "vgg16", up_to: str = "conv5_1"
) -> dict[str, dict[str, np.ndarray]]:
  """torchvision ``vgg16`` / ``vgg19`` state dict -> Flax params of ``VGGFeatures``.

  ``features.<i>.weight`` (O, I, kh, kw) becomes ``conv<b>_<j>/kernel`` (kh, kw, I, O);
  ``features.<i>.bias`` the bias. Other keys (the classifier) are ignored.

  Raises:
    ValueError: A batch-norm VGG (``vgg16_bn``), a missing key or a wrong shape.
  """
  if any(k.startswith("features.") and "running_mean" in k for k in state_dict):
    raise ValueError("this is a batch-norm VGG (vgg16_bn / vgg19_bn); convert the plain vgg16 / vgg19")
  shapes = vgg_layer_shapes(arch, up_to)
  params = {}
  for name, prefix in torchvision_layer_map(arch, up_to).items():
    for kind in ("weight", "bias"):
      if f"{prefix}.{kind}" not in state_dict:
        raise ValueError(f"state dict has no {prefix}.{kind} ({name} of {arch}); is it torchvision's {arch}?")
    w = np.asarray(_numpy(state_dict[f"{prefix}.weight"]), np.float32)
    b = np.asarray(_numpy(state_dict[f"{prefix}.bias"]), np.float32)
    kernel = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w
    if kernel.shape != shapes[name][0] or b.shape != shapes[name][1]:
      raise ValueError(
        f"{prefix}: weight {w.shape} / bias {b.shape} do not fit {name} of {arch} "
        f"(expects OIHW {tuple(shapes[name][0][i] for i in (3, 2, 0, 1))})"
      )
    params[name] = {"kernel": kernel, "bias": b}
  return params


def _numpy(x) -> np.ndarray:
  return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def load_torch(path: str) -> Mapping[str, Any]:
  """A state dict from a ``.pth`` file (a bare state dict, or ``{"state_dict": ...}``)."""
  try:
    import torch  # noqa: PLC0415 (optional: only to read a .pth file)
  except ImportError as e:
    raise ImportError("reading a .pth file needs PyTorch: pip install 'jipguard[bench]' (or torch)") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
  return obj


def convert_keras_h5(path: str, arch: str = "vgg16", up_to: str = "conv5_1") -> dict[str, dict[str, np.ndarray]]:
  """Keras ``VGG16`` / ``VGG19`` weights (``.h5``) -> Flax params of ``VGGFeatures``.

  Finds each layer ``block<b>_conv<j>`` at the file's root (Keras 2 weight files), under
  ``model_weights/`` (a whole saved model) or ``layers/<name>/vars`` (Keras 3 ``.weights.h5``);
  its rank-4 array is the kernel (already HWIO) and its rank-1 array the bias.
  """
  try:
    import h5py  # noqa: PLC0415 (optional: only to read Keras .h5 weights)
  except ImportError as e:
    raise ImportError("reading Keras .h5 weights needs h5py: pip install h5py") from e
  shapes = vgg_layer_shapes(arch, up_to)
  params = {}
  with h5py.File(path, "r") as f:
    for name, layer in keras_layer_map(arch, up_to).items():
      group = next((f[p] for p in (layer, f"model_weights/{layer}", f"layers/{layer}/vars") if p in f), None)
      if group is None:
        raise ValueError(f"{path}: no layer {layer} ({name} of {arch})")
      arrays = []
      group.visititems(
        lambda _, obj, arrays=arrays: (
          arrays.append(np.asarray(obj, np.float32)) if isinstance(obj, h5py.Dataset) else None
        )
      )
      kernels = [a for a in arrays if a.ndim == 4]
      biases = [a for a in arrays if a.ndim == 1]
      if len(kernels) != 1 or len(biases) != 1:
        raise ValueError(f"{path}: layer {layer} holds {len(kernels)} kernels and {len(biases)} biases, expected 1 + 1")
      if kernels[0].shape != shapes[name][0] or biases[0].shape != shapes[name][1]:
        raise ValueError(
          f"{path}: {layer} has kernel {kernels[0].shape} / bias {biases[0].shape}, "
          f"{name} of {arch} needs {shapes[name]}"
        )
      params[name] = {"kernel": kernels[0], "bias": biases[0]}
  return params


def convert(arch: str, out: str, *, torch_path: str | None = None, keras_path: str | None = None) -> VGGWeights:
  """Converts a torchvision (``torch_path``) or Keras (``keras_path``) VGG into the weights file
  ``out`` and reads it back (so a file that would not load is never left as a success).

  Raises:
    ValueError: Not exactly one source, or a source that does not fit ``arch``.
    ImportError: torch / h5py missing for that source.
  """
  if (torch_path is None) == (keras_path is None):
    raise ValueError("give exactly one of torch_path and keras_path")
  if torch_path is not None:
    params, prep, source = convert_torch_state_dict(load_torch(torch_path), arch), "torch", torch_path
  else:
    params, prep, source = convert_keras_h5(keras_path, arch), "caffe", keras_path
  save_vgg_weights(out, arch, prep, params, source=source)
  return load_vgg_weights(out)
