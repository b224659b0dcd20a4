"""PyTorch reference of jipguard's stacked-ensemble training, for the benchmarks only.

The package never imports this module (PyTorch is an optional ``bench`` extra). It holds

* :class:`TorchMLP`, :class:`TorchCNN` and :class:`TorchResNet`: the same networks as
  ``jipguard.models.MLP``, ``jipguard.models.CNN`` and ``jipguard.models.ResNet`` (NCHW, the
  PyTorch convention);
* :func:`from_flax`: builds one such module per member from a jipguard ``EnsembleState``,
  so that both sides start from the same weights;
* two ensemble trainers with one ``step(x_MxB..., y_MxB) -> loss_M``:
  :class:`FuncEnsemble` (``torch.func``: ``stack_module_state`` + ``functional_call`` +
  ``vmap(grad)``, one ``torch.optim.Adam`` over the stacked tensors) and
  :class:`LoopEnsemble` (a Python loop over M modules, each with its own Adam);
* :func:`train_epoch`: one epoch of either trainer, on a fresh per-member permutation of
  each member's sample, or on an explicit batch order (``order_MxTxB``) for the
  equivalence check against JAX.

Adam over stacked tensors equals one Adam per member: Adam is elementwise and every
member takes the same number of steps, so its bias correction is shared. The
benchmark's equivalence check (``kernels.check_equivalence``) verifies this against
optax's per-member Adam.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import copy
import functools
import operator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class TorchMLP(nn.Module):
  """``jipguard.models.MLP``: flatten -> 256 -> ReLU -> 256 -> ReLU -> num_classes."""

  def __init__(self, in_features: int = 784, hidden: Sequence[int] = (256, 256), num_classes: int = 10):
    super().__init__()
    widths = [in_features, *hidden, num_classes]
    self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

  def forward(self, x_BxCxHxW: torch.Tensor) -> torch.Tensor:
    x = x_BxCxHxW.flatten(1)
    for layer in self.dense[:-1]:
      x = F.relu(layer(x))
    return self.dense[-1](x)


class TorchCNN(nn.Module):
  """``jipguard.models.CNN``: [conv3x3 BN ReLU] x2 -> maxpool -> dropout, twice; dense, dense.

  Convs have no bias; BatchNorm2d(momentum=0.1) is flax's ``BatchNorm(momentum=0.9)``
  (both eps 1e-5; torch updates its running variance with the unbiased batch variance,
  flax with the biased one, which changes no training loss).
  """

  def __init__(
    self,
    in_channels: int = 3,
    image_hw: int = 32,
    num_classes: int = 10,
    widths: Sequence[int] = (32, 64),
    dense: int = 512,
    conv_dropout: float = 0.25,
    dense_dropout: float = 0.5,
  ):
    super().__init__()
    layers: list[nn.Module] = []
    c = in_channels
    for width in widths:
      for _ in range(2):
        layers += [
          nn.Conv2d(c, width, 3, padding=1, bias=False),
          nn.BatchNorm2d(width, eps=1e-5, momentum=0.1),
          nn.ReLU(),
        ]
        c = width
      layers += [nn.MaxPool2d(2), nn.Dropout(conv_dropout)]
    self.features = nn.Sequential(*layers)
    hw = image_hw // 2 ** len(widths)
    self.dense = nn.ModuleList([nn.Linear(c * hw * hw, dense), nn.Linear(dense, num_classes)])
    self.dropout = nn.Dropout(dense_dropout)

  def forward(self, x_BxCxHxW: torch.Tensor) -> torch.Tensor:
    x = self.features(x_BxCxHxW).flatten(1)
    x = self.dropout(F.relu(self.dense[0](x)))
    return self.dense[1](x)


class _SameConv(nn.Module):
  """A bias-free conv with flax's ``SAME`` padding: for stride 2 on even sizes flax pads
  (0, 1), not torch's symmetric (1, 1)."""

  def __init__(self, c_in: int, c_out: int, k: int, stride: int, image_hw: int):
    super().__init__()
    out = -(-image_hw // stride)
    total = max((out - 1) * stride + k - image_hw, 0)
    self.pad = (total // 2, total - total // 2) * 2  # (left, right, top, bottom)
    self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.pad(x, self.pad) if any(self.pad) else x)


class _TorchBlock(nn.Module):
  def __init__(self, c_in: int, width: int, stride: int, image_hw: int):
    super().__init__()
    self.conv0 = _SameConv(c_in, width, 3, stride, image_hw)
    self.bn0 = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
    self.conv1 = _SameConv(width, width, 3, 1, -(-image_hw // stride))
    self.bn1 = nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
    self.shortcut = None
    if c_in != width or stride != 1:
      self.shortcut = nn.Sequential(
        _SameConv(c_in, width, 1, stride, image_hw), nn.BatchNorm2d(width, eps=1e-5, momentum=0.1)
      )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn1(self.conv1(F.relu(self.bn0(self.conv0(x)))))
    return F.relu((x if self.shortcut is None else self.shortcut(x)) + y)


class TorchResNet(nn.Module):
  """``jipguard.models.ResNet``: conv3x3(16) BN ReLU -> basic blocks -> global mean -> dense."""

  def __init__(
    self,
    in_channels: int = 3,
    image_hw: int = 32,
    num_classes: int = 10,
    stage_sizes: Sequence[int] = (1, 1, 1),
    widths: Sequence[int] = (16, 32, 64),
  ):
    super().__init__()
    self.stem = _SameConv(in_channels, widths[0], 3, 1, image_hw)
    self.bn = nn.BatchNorm2d(widths[0], eps=1e-5, momentum=0.1)
    blocks, c, hw = [], widths[0], image_hw
    for stage, (n, width) in enumerate(zip(stage_sizes, widths)):
      for b in range(n):
        stride = 2 if stage > 0 and b == 0 else 1
        blocks.append(_TorchBlock(c, width, stride, hw))
        c, hw = width, -(-hw // stride)
    self.blocks = nn.ModuleList(blocks)
    self.dense = nn.Linear(c, num_classes)

  def forward(self, x_BxCxHxW: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn(self.stem(x_BxCxHxW)))
    for block in self.blocks:
      x = block(x)
    return self.dense(x.mean((2, 3)))


def _chw_rows(kernel_INxOUT: np.ndarray, hwc: tuple[int, int, int]) -> np.ndarray:
  """Reorders a dense kernel's input rows from flax's (h, w, c) flattening to torch's (c, h, w)."""
  h, w, c = hwc
  out = kernel_INxOUT.shape[1]
  return kernel_INxOUT.reshape(h, w, c, out).transpose(2, 0, 1, 3).reshape(h * w * c, out)


def _linear(kernel: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
  # flax Dense kernel is (in, out); torch Linear weight is (out, in).
  return {"weight": kernel.T, "bias": bias}


def _mlp_state(params: dict[str, Any], image_hwc: tuple[int, int, int]) -> dict[str, np.ndarray]:
  names = sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
  state = {}
  for i, name in enumerate(names):
    kernel = params[name]["kernel"]
    if i == 0:
      kernel = _chw_rows(kernel, image_hwc)
    for k, v in _linear(kernel, params[name]["bias"]).items():
      state[f"dense.{i}.{k}"] = v
  return state


def _cnn_state(module: TorchCNN, params: dict[str, Any], batch_stats: dict[str, Any]) -> dict[str, np.ndarray]:
  convs = [i for i, layer in enumerate(module.features) if isinstance(layer, nn.Conv2d)]
  norms = [i for i, layer in enumerate(module.features) if isinstance(layer, nn.BatchNorm2d)]
  state = {}
  for j, (ci, ni) in enumerate(zip(convs, norms, strict=True)):
    state[f"features.{ci}.weight"] = params[f"Conv_{j}"]["kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
    bn, stats = params[f"BatchNorm_{j}"], batch_stats[f"BatchNorm_{j}"]
    state.update(
      {
        f"features.{ni}.weight": bn["scale"],
        f"features.{ni}.bias": bn["bias"],
        f"features.{ni}.running_mean": stats["mean"],
        f"features.{ni}.running_var": stats["var"],
      }
    )
  c = module.features[convs[-1]].out_channels
  hw = int(round((params["Dense_0"]["kernel"].shape[0] // c) ** 0.5))
  dense0 = _chw_rows(params["Dense_0"]["kernel"], (hw, hw, c))
  for i, kernel in enumerate([dense0, params["Dense_1"]["kernel"]]):
    for k, v in _linear(kernel, params[f"Dense_{i}"]["bias"]).items():
      state[f"dense.{i}.{k}"] = v
  return state


def _bn_state(prefix: str, bn: dict[str, Any], stats: dict[str, Any]) -> dict[str, np.ndarray]:
  return {
    f"{prefix}.weight": bn["scale"],
    f"{prefix}.bias": bn["bias"],
    f"{prefix}.running_mean": stats["mean"],
    f"{prefix}.running_var": stats["var"],
  }


def _resnet_state(module: TorchResNet, params: dict[str, Any], batch_stats: dict[str, Any]) -> dict[str, np.ndarray]:
  state = {"stem.conv.weight": params["Conv_0"]["kernel"].transpose(3, 2, 0, 1)}
  state.update(_bn_state("bn", params["BatchNorm_0"], batch_stats["BatchNorm_0"]))
  for i, block in enumerate(module.blocks):
    p, s = params[f"ResidualBlock_{i}"], batch_stats[f"ResidualBlock_{i}"]
    for j in range(2):
      state[f"blocks.{i}.conv{j}.conv.weight"] = p[f"Conv_{j}"]["kernel"].transpose(3, 2, 0, 1)
      state.update(_bn_state(f"blocks.{i}.bn{j}", p[f"BatchNorm_{j}"], s[f"BatchNorm_{j}"]))
    if block.shortcut is not None:
      state[f"blocks.{i}.shortcut.0.conv.weight"] = p["Conv_2"]["kernel"].transpose(3, 2, 0, 1)
      state.update(_bn_state(f"blocks.{i}.shortcut.1", p["BatchNorm_2"], s["BatchNorm_2"]))
  state.update({f"dense.{k}": v for k, v in _linear(params["Dense_0"]["kernel"], params["Dense_0"]["bias"]).items()})
  return state


def _map(fn, tree: Mapping[str, Any]) -> dict[str, Any]:
  return {k: _map(fn, v) if isinstance(v, Mapping) else fn(v) for k, v in tree.items()}


def from_flax(
  make_module, params: dict[str, Any], batch_stats: dict[str, Any] | None, image_hwc: tuple[int, int, int]
) -> list[nn.Module]:
  """One torch module per member, holding member m's flax weights.

  Args:
    make_module: Builds an empty :class:`TorchMLP`, :class:`TorchCNN` or :class:`TorchResNet`.
    params: Flax params with a leading member axis M (numpy or jax arrays).
    batch_stats: Flax batch statistics with a leading member axis (CNN), or None / {}.
    image_hwc: Shape of one input image (to reorder the first dense layer of an MLP).

  Returns:
    M modules in train mode.
  """
  params, batch_stats = _map(np.asarray, params), _map(np.asarray, batch_stats or {})
  leaves = []
  _map(leaves.append, params)
  num_members = leaves[0].shape[0]
  modules = []
  for m in range(num_members):
    member = functools.partial(_map, operator.itemgetter(m))
    module = make_module()
    if isinstance(module, TorchCNN):
      state = _cnn_state(module, member(params), member(batch_stats))
    elif isinstance(module, TorchResNet):
      state = _resnet_state(module, member(params), member(batch_stats))
    else:
      state = _mlp_state(member(params), image_hwc)
    result = module.load_state_dict(
      {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, strict=False
    )
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
      raise ValueError(f"flax -> torch: missing {missing}, unexpected {result.unexpected_keys}")
    modules.append(module.train())
  return modules


class EnsembleTrainerLike(Protocol):
  def step(self, x_MxBxCxHxW: torch.Tensor, y_MxB: torch.Tensor) -> torch.Tensor:
    """One Adam step of every member on its own batch; returns the M losses."""


class FuncEnsemble:
  """M members as stacked tensors: ``vmap(grad_and_value(functional_call))`` + one Adam.

  Batch-norm running statistics are stacked buffers updated inside the vmapped call;
  dropout draws differ per member (``randomness="different"``).
  """

  def __init__(self, modules: Sequence[nn.Module], lr: float):
    self.params, self.buffers = torch.func.stack_module_state(list(modules))
    base = copy.deepcopy(modules[0]).to("meta")

    def loss_fn(params, buffers, x_BxCxHxW, y_B):
      logits = torch.func.functional_call(base, (params, buffers), (x_BxCxHxW,))
      return F.cross_entropy(logits, y_B)

    self._grads = torch.func.vmap(torch.func.grad_and_value(loss_fn), randomness="different")
    self.opt = torch.optim.Adam(list(self.params.values()), lr=lr)

  def step(self, x_MxBxCxHxW: torch.Tensor, y_MxB: torch.Tensor) -> torch.Tensor:
    grads, loss_M = self._grads(self.params, self.buffers, x_MxBxCxHxW, y_MxB)
    for name, p in self.params.items():
      p.grad = grads[name]
    self.opt.step()
    return loss_M.detach()


class LoopEnsemble:
  """M independent ``nn.Module`` s, each with its own ``torch.optim.Adam``, stepped in turn."""

  def __init__(self, modules: Sequence[nn.Module], lr: float):
    self.modules = list(modules)
    self.opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in self.modules]

  def step(self, x_MxBxCxHxW: torch.Tensor, y_MxB: torch.Tensor) -> torch.Tensor:
    losses = []
    for m, (module, opt) in enumerate(zip(self.modules, self.opts)):
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(module(x_MxBxCxHxW[m]), y_MxB[m])
      loss.backward()
      opt.step()
      losses.append(loss.detach())
    return torch.stack(losses)


def random_order(indices_MxS: torch.Tensor, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
  """Pool indices of one epoch's batches: a fresh permutation per member, ``(M, S // B, B)``."""
  m, s = indices_MxS.shape
  steps = s // batch_size
  perm_MxS = torch.argsort(torch.rand(m, s, generator=generator), dim=1).to(indices_MxS.device)
  return indices_MxS.gather(1, perm_MxS[:, : steps * batch_size]).view(m, steps, batch_size)


def train_epoch(
  trainer: EnsembleTrainerLike,
  images_NxCxHxW: torch.Tensor,
  labels_N: torch.Tensor,
  indices_MxS: torch.Tensor | None = None,
  batch_size: int = 128,
  *,
  order_MxTxB: torch.Tensor | None = None,
  generator: torch.Generator | None = None,
) -> torch.Tensor:
  """One epoch of every member; returns the M mean training losses (as jipguard does).

  Args:
    trainer: A :class:`FuncEnsemble` or :class:`LoopEnsemble`.
    images_NxCxHxW: The shared pool, float32 NCHW.
    labels_N: Labels of the pool (int64).
    indices_MxS: Each member's sample of the pool; batches are a fresh permutation of it,
      ``S // batch_size`` full batches (the remainder is skipped, as in jipguard).
    batch_size: Minibatch size per member.
    order_MxTxB: Explicit pool indices of every member's batches (overrides the shuffle).
    generator: Torch generator for the shuffle.
  """
  if order_MxTxB is None:
    order_MxTxB = random_order(indices_MxS, batch_size, generator)
  losses_TxM = []
  for t in range(order_MxTxB.shape[1]):
    idx_MxB = order_MxTxB[:, t]
    losses_TxM.append(trainer.step(images_NxCxHxW[idx_MxB], labels_N[idx_MxB]))
  return torch.stack(losses_TxM).mean(0)


# ----------------------------------------------------------------- IPProtect sanitize step


def _distance(
  a: torch.Tensor, b: torch.Tensor, kind: str, temperature: float = 1.0, margin: float = 1.0
) -> torch.Tensor:
  """``jipguard.ipprotect.objective.distance``: L2 over the last axis, of logits or of softmax(logits / T), or the
  hinge on the logit margin of b's class in a."""
  if kind == "margin":
    is_c = F.one_hot(b.argmax(-1), a.shape[-1]).bool()
    a_c = torch.where(is_c, a, torch.zeros_like(a)).sum(-1)
    other = torch.where(is_c, torch.full_like(a, -torch.inf), a).amax(-1)
    return torch.clamp(other - a_c + margin, min=0.0)
  if kind == "kl":
    log_p, log_q = F.log_softmax(b / temperature, dim=-1), F.log_softmax(a / temperature, dim=-1)
    return torch.sum(log_p.exp() * (log_p - log_q), dim=-1)
  if kind == "probs":
    a, b = F.softmax(a / temperature, dim=-1), F.softmax(b / temperature, dim=-1)
  return torch.sqrt(torch.sum(torch.square(a - b), dim=-1) + 1e-12)


class Sanitizer:
  """Algorithm 1's step of IPProtect in PyTorch: the paper's reference formulation.

  Every image's Eq. 9 (mean L over its subset of the M frozen models, plus the
  security hinge to its anchor), backward to the pixels only (the models'
  ``requires_grad`` is off, as in the best PyTorch practice) and ``torch.optim.Adam`` on
  the pixels. ``variant="func"`` evaluates the M models as one ``torch.func.vmap`` of
  ``functional_call`` over stacked weights; ``variant="loop"`` loops over the modules.
  """

  def __init__(
    self,
    modules: Sequence[nn.Module],
    x_BxCxHxW: torch.Tensor,
    anchors_BxCxHxW: torch.Tensor,
    targets_BxMxC: torch.Tensor,
    *,
    variant: str,
    lr: float,
    lam: float,
    tau: float,
    loss: str = "logits",
    temperature: float = 1.0,
    margin: float = 1.0,
  ):
    self.modules = [m.eval().requires_grad_(False) for m in modules]
    self.x = x_BxCxHxW.clone().requires_grad_(True)
    self.anchors, self.targets = anchors_BxCxHxW, targets_BxMxC
    self.opt = torch.optim.Adam([self.x], lr=lr)
    self.lam, self.tau, self.loss, self.temperature, self.margin = lam, tau, loss, temperature, margin
    if variant == "func":
      params, buffers = torch.func.stack_module_state(self.modules)
      base = copy.deepcopy(self.modules[0]).to("meta")
      call = lambda p, b, x: torch.func.functional_call(base, (p, b), (x,))
      vmapped = torch.func.vmap(call, in_dims=(0, 0, None))

      def logits(x):
        # cuDNN's eval-mode batch norm cannot run under torch.func.vmap ("NYI: querying
        # is_contiguous inside of vmap"); torch's native kernels can.
        with torch.backends.cudnn.flags(enabled=False):
          return vmapped(params, buffers, x).transpose(0, 1)

      self._logits = logits
    elif variant == "loop":
      self._logits = lambda x: torch.stack([m(x) for m in self.modules], dim=1)
    else:
      raise ValueError(f"variant must be 'func' or 'loop', got {variant!r}")

  def step(self, weights_BxM: torch.Tensor) -> torch.Tensor:
    """One Adam step of every image; returns each image's utility loss before it."""
    self.opt.zero_grad(set_to_none=True)
    per_model_BxM = _distance(self._logits(self.x), self.targets, self.loss, self.temperature, self.margin)
    utility_B = (weights_BxM * per_model_BxM).sum(1) / weights_BxM.sum(1)
    rms_B = torch.sqrt(torch.square(self.x - self.anchors).flatten(1).mean(1))
    total = (utility_B + self.lam * torch.clamp(rms_B - self.tau, min=0.0)).sum()
    total.backward()
    self.opt.step()
    return utility_B.detach()


def sanitize_dataset(
  tr_modules: Sequence[nn.Module],
  v_modules: Sequence[nn.Module],
  images_BxCxHxW: torch.Tensor,
  x0_BxCxHxW: torch.Tensor,
  anchors_BxCxHxW: torch.Tensor,
  *,
  variant: str,
  steps: int,
  model_batch: int,
  val_every: int,
  min_steps: int,
  zeta: float,
  lr: float,
  lam: float,
  tau: float,
  loss: str,
  temperature: float = 1.0,
  margin: float = 1.0,
  generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
  """The paper's Algorithm 1 on one batch of images, in PyTorch, as jipguard defines it.

  Each step every image draws its own subset of ``model_batch`` of the |Omega_Tr| models;
  every ``val_every`` steps (from ``min_steps`` on) an image whose mean Omega_V loss
  changed by less than ``zeta`` stops, and stopped images keep their pixels. The batch
  runs until every image stopped or ``steps`` steps: converged images stay in the batch
  (the straightforward formulation).

  Returns:
    ``(sanitized images, steps taken per image)``.
  """
  with torch.no_grad():
    targets = torch.stack([m.eval()(images_BxCxHxW) for m in tr_modules], dim=1)
    targets_v = torch.stack([m.eval()(images_BxCxHxW) for m in v_modules], dim=1)
  for m in v_modules:
    m.requires_grad_(False)
  san = Sanitizer(
    tr_modules,
    x0_BxCxHxW,
    anchors_BxCxHxW,
    targets,
    variant=variant,
    lr=lr,
    lam=lam,
    tau=tau,
    loss=loss,
    temperature=temperature,
    margin=margin,
  )
  b, dev = images_BxCxHxW.shape[0], images_BxCxHxW.device
  active = torch.ones(b, dtype=torch.bool, device=dev)
  prev = torch.full((b,), float("inf"), device=dev)
  taken = torch.zeros(b, dtype=torch.int64, device=dev)
  for t in range(1, steps + 1):
    weights = (torch.argsort(torch.rand(b, len(tr_modules), generator=generator), dim=1) < model_batch).float()
    frozen = san.x.detach()[~active].clone()
    san.step(weights.to(dev))
    with torch.no_grad():
      san.x[~active] = frozen
    taken += active
    if t % val_every == 0:
      with torch.no_grad():
        logits_v = torch.stack([m(san.x) for m in v_modules], dim=1)
        val = _distance(logits_v, targets_v, loss, temperature, margin).mean(1)
      active &= ~((val - prev).abs() < zeta) | (t < min_steps)
      prev = val
      if not bool(active.any()):
        break
  return san.x.detach(), taken
