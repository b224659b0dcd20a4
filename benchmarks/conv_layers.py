"""A probe, not a table row: each convolution of ResNet-8 (B=128, 32x32x3) under each lowering.

    python benchmarks/conv_layers.py              # ~1 min on 2 idle cores
    python benchmarks/conv_layers.py --batch 64
    python benchmarks/conv_layers.py --skip-layers --models resnet8 cnn --repeats 9

For every conv shape of ``models.ResNet`` (stage_sizes (1, 1, 1)) it times, jitted with the
options a conv model's training program compiles with (``ensemble._cpu.CPU_CONV_OPTIONS`` on
CPU), the forward, the input gradient and the kernel gradient of ``lax.conv_general_dilated``
(``conv_impl="xla"``) and of ``models.conv_patches`` (``"patches"``); then one training step of
one member (Adam, the trainer's ``_member_step``) of each of ``--models`` under ``xla``,
``xla_barrier``, ``patches`` and ``auto``, alternated so that load from other jobs falls on all
of them. Medians of ``--repeats`` calls. Where PyTorch is installed, the same layers through
``torch.nn.functional.conv2d`` (NCHW, autograd; the column to compare the library convolutions
with) and one ``torch_reference`` training step (``LoopEnsemble`` of one member) join the
alternation, on ``os.cpu_count()`` threads as in ``run.py``. (``xla_barrier`` differs from ``xla`` only in a
program that differentiates through an activation, so it has no per-layer column.)
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jipguard import models  # noqa: E402
from jipguard.ensemble import _cpu  # noqa: E402
from jipguard.ensemble.training import _member_step  # noqa: E402

try:
  import torch
  import torch.nn.functional as F

  from benchmarks import torch_reference
except ImportError:  # The torch columns need the benchmarks' extra.
  torch = None

# (input side, in channels, out channels, kernel, stride) of ResNet-8 on 32x32x3.
SHAPES = [(32, 3, 16, 3, 1), (32, 16, 16, 3, 1), (32, 16, 32, 3, 2), (16, 32, 32, 3, 1), (32, 16, 32, 1, 2)]
SHAPES += [(16, 32, 64, 3, 2), (8, 64, 64, 3, 1), (16, 32, 64, 1, 2)]


def _jit(fn):
  options = _cpu.CPU_CONV_OPTIONS if jax.default_backend() == "cpu" and _cpu._xla_takes_conv_options() else None
  return jax.jit(fn, compiler_options=options)


def _median_ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def _xla(x, k, s):
  return jax.lax.conv_general_dilated(x, k, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _patches(x, k, s):
  return models.conv_patches(x, k, (s, s))


def _torch():
  """torch with ``os.cpu_count()`` threads, or None where it is not installed."""
  if torch is not None:
    torch.set_num_threads(os.cpu_count())
  return torch


def _torch_layer_ms(x, k, g, s: int, repeats: int) -> list[float]:
  """Forward, input gradient and kernel gradient of ``F.conv2d`` with flax's SAME padding."""
  x = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
  k = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())
  g = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
  h, ks = x.shape[-1], k.shape[-1]
  total = max((g.shape[-1] - 1) * s + ks - h, 0)
  pad = (total // 2, total - total // 2) * 2

  def fwd():
    with torch.no_grad():
      return F.conv2d(F.pad(x, pad), k, stride=s)

  def grad(wrt):
    xx, kk = x.detach().requires_grad_(wrt == "x"), k.detach().requires_grad_(wrt == "k")
    y = F.conv2d(F.pad(xx, pad), kk, stride=s)
    return torch.autograd.grad(y, xx if wrt == "x" else kk, g)[0]

  out = []
  for fn in (fwd, lambda: grad("x"), lambda: grad("k")):
    fn()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    out.append(1e3 * float(np.median(times)))
  return out


def layers(batch: int, repeats: int) -> None:
  _torch()
  head = "| layer | xla fwd / input grad / kernel grad ms | patches fwd / input grad / kernel grad ms |"
  print(head + (" torch fwd / input grad / kernel grad ms |" if torch is not None else ""))
  print("|---|---|---|" + ("---|" if torch is not None else ""))
  rng = np.random.default_rng(0)
  for h, c, o, ks, s in SHAPES:
    x = jnp.asarray(rng.random((batch, h, h, c), np.float32))
    k = jnp.asarray(rng.random((ks, ks, c, o), np.float32))
    g = jnp.asarray(rng.random((batch, -(-h // s), -(-h // s), o), np.float32))
    cells = []
    for impl in (_xla, _patches):
      conv = functools.partial(impl, s=s)
      fwd = _jit(conv)
      dx = _jit(lambda x, k, g, conv=conv: jax.vjp(lambda x: conv(x, k), x)[1](g)[0])
      dk = _jit(lambda x, k, g, conv=conv: jax.vjp(lambda k: conv(x, k), k)[1](g)[0])
      ms = [_median_ms(fwd, x, k, repeats=repeats), _median_ms(dx, x, k, g, repeats=repeats)]
      ms.append(_median_ms(dk, x, k, g, repeats=repeats))
      cells.append(" / ".join(f"{t:.1f}" for t in ms))
    if torch is not None:
      cells.append(" / ".join(f"{t:.1f}" for t in _torch_layer_ms(x, k, g, s, repeats)))
    print(f"| {h}x{h}x{c} -> {o}, {ks}x{ks} stride {s} | " + " | ".join(cells) + " |")


def steps(batch: int, repeats: int, model_name: str = "resnet8") -> None:
  tx = optax.adam(1e-3)
  x = jnp.asarray(np.random.default_rng(0).random((batch, 32, 32, 3), np.float32))
  y = jnp.zeros((batch,), jnp.int32)
  programs = {}
  for impl in ("xla", "xla_barrier", "patches", "auto"):
    model = models.get_model(model_name, 10).clone(conv_impl=impl)
    variables = model.init(jax.random.key(0), x[:1])
    step = _jit(functools.partial(_member_step, model, tx, None))
    args = (variables["params"], variables["batch_stats"], tx.init(variables["params"]), x, y, jax.random.key(1), None)
    jax.block_until_ready(step(*args))
    programs[impl] = step, args
  if _torch():
    module = {"resnet8": torch_reference.TorchResNet, "cnn": torch_reference.TorchCNN}[model_name]()
    loop = torch_reference.LoopEnsemble([module], lr=1e-3)
    tx_ = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())[None]
    ty = torch.zeros((1, batch), dtype=torch.int64)
    loop.step(tx_, ty)
    programs["torch loop"] = (lambda: loop.step(tx_, ty)), ()
  times = {impl: [] for impl in programs}
  for _ in range(repeats):
    for impl, (step, args) in programs.items():
      times[impl].append(_median_ms(step, *args, repeats=1))
  for impl, ms in times.items():
    print(
      f"{model_name} training step, one member, B={batch}, "
      f"{impl if impl == 'torch loop' else 'conv_impl=' + impl}: {np.median(ms):.0f} ms "
      f"(median of {repeats})"
    )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per program (default: %(default)s)")
  p.add_argument("--skip-layers", action="store_true", help="time only the training steps")
  p.add_argument("--models", nargs="+", default=["resnet8"], choices=["resnet8", "cnn"], help="(default: %(default)s)")
  a = p.parse_args()
  if not a.skip_layers:
    layers(a.batch, a.repeats)
  for name in a.models:
    steps(a.batch, a.repeats, name)


if __name__ == "__main__":
  main()
