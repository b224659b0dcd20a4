"""Benchmark kernel: the watermark verifier's grid search (signatures x images x model).

JAX: ``watermark.signature_losses``, one jitted program (vmap over the signatures of a
chunk, ``lax.map`` over chunks). PyTorch reference: a Python loop over the signatures, each
building ``g_k``, watermarking the images (``x @ g_k^T``, clamp) and running the same
network in inference mode (``torch.inference_mode``), which is how one writes Eq. 6 in
PyTorch. Both start from the same weights (``torch_reference.from_flax``); the check
compares the whole ``K x N`` loss matrices.

Exposes ``SIZES(quick)`` and ``row(size, repeats, budget_s=None)`` in the style of
``benchmarks/kernels.py``, which registers it in ``KERNELS`` as ``"watermark_grid_search"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

import jax
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks import torch_reference as tr
from jipguard import models
from jipguard.watermark import lct, verifier

CHECK_RTOL = 1e-3
NAME = "watermark_grid_search"


def _kernels():
  """``benchmarks.kernels``, imported when first used: it registers this module at import time,
  so a module-level import would be circular when this module is imported first."""
  from benchmarks import kernels  # noqa: PLC0415 (kernels imports torch, which the package does not need)

  return kernels


@dataclasses.dataclass(frozen=True)
class GridSize:
  """K signatures x N images through ``model``.

  Attributes:
    model: ``"mlp"`` (28x28x3: Fashion-MNIST tinted) or ``"cnn"`` (32x32x3, CIFAR-shaped).
    signatures: K.
    images: N (one user's images).
  """

  model: str
  signatures: int
  images: int

  @property
  def image_hwc(self) -> tuple[int, int, int]:
    return (28, 28, 3) if self.model == "mlp" else (32, 32, 3)

  @property
  def label(self) -> str:
    arch = "MLP 2352-256-256-10" if self.model == "mlp" else "CNN 32x32x3"
    return f"K={self.signatures} x N={self.images} {arch}"

  @property
  def flops(self) -> float:
    """Forward FLOPs of the network on every watermarked image (the 3x3 colour maps are negligible)."""
    return _kernels().forward_flops(self.model, self.image_hwc) * self.signatures * self.images


def SIZES(quick: bool) -> list[GridSize]:  # noqa: N802 (the name the lead's registry expects)
  if quick:
    return [GridSize("mlp", 36, 100)]
  return [GridSize("mlp", 360, 100), GridSize("mlp", 360, 1000), GridSize("cnn", 36, 100)]


def _setup(size: GridSize):
  """Flax model + variables (random init, the test split's class count), images, labels, signatures."""
  model = models.get_model(size.model, 10)
  rng = np.random.default_rng(0)
  images = rng.random((size.images, *size.image_hwc), dtype=np.float32)
  labels = rng.integers(0, 10, size.images).astype(np.int32)
  init = jax.jit(functools.partial(model.init, train=False), compiler_options={"xla_backend_optimization_level": 0})
  variables = init(jax.random.key(0), images[:1])
  sigs = np.linspace(0, 360, size.signatures, endpoint=False).astype(np.float32)
  return model, variables, images, labels, sigs


def _torch_module(size: GridSize, variables) -> torch.nn.Module:
  h, _, c = size.image_hwc
  if size.model == "mlp":
    make = functools.partial(tr.TorchMLP, in_features=int(np.prod(size.image_hwc)))
  else:
    make = functools.partial(tr.TorchCNN, in_channels=c, image_hw=h)
  stacked = jax.tree.map(lambda a: np.asarray(a)[None], variables)
  (module,) = tr.from_flax(make, stacked["params"], stacked.get("batch_stats"), size.image_hwc)
  return module.eval().to(_kernels().torch_device())


def torch_grid_losses(
  module: torch.nn.Module, images_NxHxWx3: torch.Tensor, labels_N: torch.Tensor, signatures: np.ndarray
) -> torch.Tensor:
  """The PyTorch reference: a loop over signatures, ``K x N`` cross-entropies."""
  out = []
  t_yiq = torch.from_numpy(lct.T_YIQ.copy())
  with torch.inference_mode():
    for k in signatures:
      theta = torch.deg2rad(torch.tensor(float(k)))
      c, s = torch.cos(theta), torch.sin(theta)
      rot = torch.stack(
        [
          torch.stack([torch.ones(()), torch.zeros(()), torch.zeros(())]),
          torch.stack([torch.zeros(()), c, -s]),
          torch.stack([torch.zeros(()), s, c]),
        ]
      )
      g = torch.linalg.solve(t_yiq, rot @ t_yiq).to(images_NxHxWx3.device)  # Eq. 5: T^-1 T_k T.
      x = torch.clamp(images_NxHxWx3 @ g.T, 0.0, 1.0).permute(0, 3, 1, 2)
      out.append(F.cross_entropy(module(x), labels_N, reduction="none"))
  return torch.stack(out)


def max_rel_err(size: GridSize) -> float:
  """Max |JAX - torch| / max |torch| over the K x N loss matrices (one call each, untimed)."""
  model, variables, images, labels, sigs = _setup(size)
  module = _torch_module(size, variables)
  dev = _kernels().torch_device()
  ref = (
    torch_grid_losses(module, torch.from_numpy(images).to(dev), torch.from_numpy(labels.astype(np.int64)).to(dev), sigs)
    .cpu()
    .numpy()
  )
  got = verifier.signature_losses(model, variables, images, labels, sigs)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))


def row(size: GridSize, repeats: int, budget_s: float | None = None) -> harness.Row:
  _kernels().configure_torch()
  model, variables, images, labels, sigs = _setup(size)
  module = _torch_module(size, variables)
  dev = _kernels().torch_device()
  images_t, labels_t = torch.from_numpy(images).to(dev), torch.from_numpy(labels.astype(np.int64)).to(dev)
  x, y = jax.device_put(images), jax.device_put(labels)
  last = {}

  def jax_call():
    last["jax"] = verifier.signature_losses(model, variables, x, y, sigs)  # Returns numpy: blocks.

  def torch_call():
    last["torch"] = _kernels().torch_sync(torch_grid_losses(module, images_t, labels_t, sigs))

  with harness.jax_compile_seconds() as clock:
    jax_t = harness.time_calls(jax_call, repeats, budget_s)
  torch_t = harness.time_calls(torch_call, repeats, budget_s)
  ref = last["torch"].cpu().numpy()
  err = float(np.max(np.abs(last["jax"] - ref)) / max(np.max(np.abs(ref)), 1e-12))
  return harness.make_row(
    NAME,
    size.label,
    size.flops,
    jax_t,
    clock.seconds,
    None,
    torch_t,
    signatures=size.signatures,
    images=size.images,
    check_max_rel_err=err,
    check_passed=err < CHECK_RTOL,
  )


def main(argv: list[str] | None = None) -> None:
  """Runs this kernel alone: ``python -m benchmarks.watermark_kernel --out DIR [--quick]``."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--workdir",
    "--out",  # The name in the commands recorded by results/ before --workdir became jipguard's one name.
    dest="out",
    required=True,
    help="directory for results.json / .md / .csv",
  )
  p.add_argument("--quick", action="store_true")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--match", help="only sizes whose label contains this")
  args = p.parse_args(argv)
  _kernels().configure_torch()
  registry = {k: _kernels().KERNELS[k] for k in ("gemm_roofline", NAME)}
  rows = harness.run(registry, list(registry), quick=args.quick, repeats=args.repeats, match=args.match)
  machine = harness.machine_info([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
  print(harness.write(args.out, rows, machine))


if __name__ == "__main__":
  main()
