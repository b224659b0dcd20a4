"""Benchmark kernel: the feature-space perturbation (FSP) of dataset authorization control.

JAX: ``authorization.fsp.perturb``, :func:`fsp.perturb_one` vmapped over the batch and jitted
once (10 sign steps with MI-FGSM momentum, unrolled). PyTorch reference: the same attack as
one writes it in PyTorch, on the batch at once: the feature trunk up to the same layer,
``autograd.grad`` of the summed squared feature distance (each image's gradient is its own),
momentum normalised per image, a sign step and the clip to the L_inf ball. Both use the CIFAR
CNN with the same weights (``torch_reference.from_flax``), features at the second block's
second batch norm (flax ``BatchNorm_3``, torch ``features[12]``), epsilon 0.07, 10 iterations.

The check compares the perturbed images: sign steps can differ where a gradient entry is
within rounding of zero, so it reports the mean |JAX - torch| divided by epsilon.

Exposes ``SIZES(quick)`` and ``row(size, repeats, budget_s=None)``, registered in
``benchmarks/kernels.py``'s ``KERNELS`` as ``"authorization_fsp"``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import harness
from benchmarks import torch_reference as tr
from jipguard import models
from jipguard.authorization import fsp

NAME = "authorization_fsp"
CHECK_TOL = 0.02  # Mean |JAX - torch| / epsilon.
_CFG = fsp.FSPConfig(layer="BatchNorm_3")
_TORCH_TRUNK = 13  # features[:13] ends with the second block's second BatchNorm2d.


def _kernels():
  from benchmarks import kernels  # noqa: PLC0415 (kernels registers this module: a top-level import is circular)

  return kernels


@dataclasses.dataclass(frozen=True)
class FSPSize:
  """B images (32x32x3) through the CIFAR CNN, 10 FSP iterations.

  Attributes:
    images: B.
  """

  images: int

  @property
  def label(self) -> str:
    return f"B={self.images} CNN 32x32x3, 10 iterations"

  @property
  def flops(self) -> float:
    """About 3x the trunk's forward FLOPs (forward + input gradient) per image and iteration,
    bounded above by the whole network's forward."""
    return 3 * _kernels().forward_flops("cnn", (32, 32, 3)) * self.images * _CFG.iterations


def SIZES(quick: bool) -> list[FSPSize]:  # noqa: N802 (the name the registry expects)
  return [FSPSize(16)] if quick else [FSPSize(64), FSPSize(256)]


def _setup(size: FSPSize):
  model = models.get_model("cnn", 10)
  rng = np.random.default_rng(0)
  x = rng.random((size.images, 32, 32, 3), dtype=np.float32)
  t = rng.random((size.images, 32, 32, 3), dtype=np.float32)
  init = jax.jit(functools.partial(model.init, train=False), compiler_options={"xla_backend_optimization_level": 0})
  variables = init(jax.random.key(0), x[:1])
  stacked = jax.tree.map(lambda a: np.asarray(a)[None], variables)
  make = functools.partial(tr.TorchCNN, in_channels=3, image_hw=32)
  (module,) = tr.from_flax(make, stacked["params"], stacked["batch_stats"], (32, 32, 3))
  return model, variables, x, t, module.eval().to(_kernels().torch_device())


def torch_fsp(
  module: tr.TorchCNN, x_BxCxHxW: torch.Tensor, t_BxCxHxW: torch.Tensor, cfg: fsp.FSPConfig
) -> torch.Tensor:
  """The PyTorch reference of ``fsp.perturb`` (see the module docstring)."""
  trunk = module.features[:_TORCH_TRUNK]
  for p in trunk.parameters():
    p.requires_grad_(False)
  with torch.no_grad():
    f_target = trunk(t_BxCxHxW)
  lo, hi = (x_BxCxHxW - cfg.epsilon).clamp(0, 1), (x_BxCxHxW + cfg.epsilon).clamp(0, 1)
  z, velocity = x_BxCxHxW.clone(), torch.zeros_like(x_BxCxHxW)
  for _ in range(cfg.iterations):
    z.requires_grad_(True)
    loss = ((trunk(z) - f_target) ** 2).sum()
    (g,) = torch.autograd.grad(loss, z)
    velocity = cfg.momentum * velocity + g / (g.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-12)
    z = torch.minimum(torch.maximum(z.detach() - cfg.step_size * velocity.sign(), lo), hi)
  return z.detach()


def row(size: FSPSize, repeats: int, budget_s: float | None = None) -> harness.Row:
  _kernels().configure_torch()
  model, variables, x, t, module = _setup(size)
  dev = _kernels().torch_device()
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
  t_t = torch.from_numpy(t.transpose(0, 3, 1, 2).copy()).to(dev)
  xj, tj = jnp.asarray(x), jnp.asarray(t)
  last = {}

  def jax_call():
    last["jax"] = jax.block_until_ready(fsp.perturb(model, variables, xj, tj, _CFG))

  def torch_call():
    last["torch"] = _kernels().torch_sync(torch_fsp(module, x_t, t_t, _CFG))

  with harness.jax_compile_seconds() as clock:
    jax_t = harness.time_calls(jax_call, repeats, budget_s)
  torch_t = harness.time_calls(torch_call, repeats, budget_s)
  ref = last["torch"].cpu().numpy().transpose(0, 2, 3, 1)
  err = float(np.mean(np.abs(np.asarray(last["jax"]) - ref)) / _CFG.epsilon)
  return harness.make_row(
    NAME,
    size.label,
    size.flops,
    jax_t,
    clock.seconds,
    torch_t,
    None,
    images=size.images,
    check_max_rel_err=err,
    check_passed=err < CHECK_TOL,
  )
