"""Converts ImageNet-pretrained VGG16/VGG19 weights into jipguard's VGG weights file.

    # torchvision (https://download.pytorch.org/models/vgg16-397923af.pth, or torchvision's
    # `models.vgg16(weights="IMAGENET1K_V1").state_dict()` saved with torch.save):
    python scripts/convert_vgg_weights.py --torch vgg16-397923af.pth --arch vgg16 --out vgg16_conv5_1.npz
    # Keras (keras.applications.VGG16 weights, e.g. vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5;
    # needs h5py):
    python scripts/convert_vgg_weights.py --keras vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 \
        --arch vgg16 --out vgg16_conv5_1.npz

then ``experiments/tradeoff.py --vgg_weights vgg16_conv5_1.npz``. The file holds the conv layers
conv1_1 .. conv5_1 (HWIO kernels, biases) and the input convention of the source
(torchvision: RGB [0, 1] with ImageNet mean / std; Keras: BGR [0, 255] minus the mean); see
``jipguard.exposure.save_vgg_weights`` for the format and docs/exposure.md for the how-to.
Nothing is downloaded: you bring the file.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
import sys
from typing import Any

import numpy as np

from jipguard import exposure


def convert_torch_state_dict(state_dict: Mapping[str, Any], arch: str = "vgg16",
                             up_to: str = "conv5_1") -> dict[str, dict[str, np.ndarray]]:
  """torchvision ``vgg16`` / ``vgg19`` state dict -> Flax params of ``VGGFeatures``.

  ``features.<i>.weight`` (O, I, kh, kw) becomes ``conv<b>_<j>/kernel`` (kh, kw, I, O);
  ``features.<i>.bias`` the bias. Other keys (the classifier) are ignored.

  Raises:
    ValueError: A batch-norm VGG (``vgg16_bn``), a missing key or a wrong shape.
  """
  if any(k.startswith("features.") and "running_mean" in k for k in state_dict):
    raise ValueError("this is a batch-norm VGG (vgg16_bn / vgg19_bn); convert the plain vgg16 / vgg19")
  shapes = exposure.vgg_layer_shapes(arch, up_to)
  params = {}
  for name, prefix in exposure.torchvision_layer_map(arch, up_to).items():
    for kind in ("weight", "bias"):
      if f"{prefix}.{kind}" not in state_dict:
        raise ValueError(f"state dict has no {prefix}.{kind} ({name} of {arch}); is it torchvision's {arch}?")
    w = np.asarray(_numpy(state_dict[f"{prefix}.weight"]), np.float32)
    b = np.asarray(_numpy(state_dict[f"{prefix}.bias"]), np.float32)
    kernel = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w
    if kernel.shape != shapes[name][0] or b.shape != shapes[name][1]:
      raise ValueError(f"{prefix}: weight {w.shape} / bias {b.shape} do not fit {name} of {arch} "
                       f"(expects OIHW {tuple(shapes[name][0][i] for i in (3, 2, 0, 1))})")
    params[name] = {"kernel": kernel, "bias": b}
  return params


def _numpy(x) -> np.ndarray:
  return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def load_torch(path: str) -> Mapping[str, Any]:
  """A state dict from a ``.pth`` file (a bare state dict, or ``{"state_dict": ...}``)."""
  try:
    import torch
  except ImportError as e:
    raise SystemExit("reading a .pth file needs PyTorch: pip install 'jipguard[bench]' (or torch)") from e
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
    import h5py
  except ImportError as e:
    raise SystemExit("reading Keras .h5 weights needs h5py: pip install h5py") from e
  shapes = exposure.vgg_layer_shapes(arch, up_to)
  params = {}
  with h5py.File(path, "r") as f:
    for name, layer in exposure.keras_layer_map(arch, up_to).items():
      group = next((f[p] for p in (layer, f"model_weights/{layer}", f"layers/{layer}/vars") if p in f), None)
      if group is None:
        raise ValueError(f"{path}: no layer {layer} ({name} of {arch})")
      arrays = []
      group.visititems(lambda _, obj: arrays.append(np.asarray(obj, np.float32)) if isinstance(obj, h5py.Dataset)
                       else None)
      kernels = [a for a in arrays if a.ndim == 4]
      biases = [a for a in arrays if a.ndim == 1]
      if len(kernels) != 1 or len(biases) != 1:
        raise ValueError(f"{path}: layer {layer} holds {len(kernels)} kernels and {len(biases)} biases, expected 1 + 1")
      if kernels[0].shape != shapes[name][0] or biases[0].shape != shapes[name][1]:
        raise ValueError(f"{path}: {layer} has kernel {kernels[0].shape} / bias {biases[0].shape}, "
                         f"{name} of {arch} needs {shapes[name]}")
      params[name] = {"kernel": kernels[0], "bias": biases[0]}
  return params


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--torch", help="torchvision vgg16 / vgg19 state dict (.pth)")
  src.add_argument("--keras", help="Keras VGG16 / VGG19 weights (.h5)")
  p.add_argument("--arch", default="vgg16", choices=sorted(exposure.VGG_BLOCKS))
  p.add_argument("--out", required=True, help="weights file to write (.npz)")
  a = p.parse_args(argv)
  if a.torch:
    params, prep, source = convert_torch_state_dict(load_torch(a.torch), a.arch), "torch", a.torch
  else:
    params, prep, source = convert_keras_h5(a.keras, a.arch), "caffe", a.keras
  exposure.save_vgg_weights(a.out, a.arch, prep, params, source=source)
  weights = exposure.load_vgg_weights(a.out)  # Checks what was written maps onto every layer.
  print(f"wrote {a.out}: {a.arch} {', '.join(weights.params)} ({prep} preprocessing)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
