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
alternation, on ``os.cpu_count()`` threads as in ``run.py``.

    python benchmarks/conv_layers.py --skip-layers --library-options   # + XNNPACK / YNNPACK convs
    python benchmarks/conv_layers.py --skip-layers --models resnet8 --batch-norm --profile

``--library-options`` adds the ``auto`` step compiled with the options that hand convolutions to
XNNPACK or YNNPACK (:data:`LIBRARY_OPTIONS`); ``--batch-norm`` times flax's BatchNorm + ReLU
forward and backward against torch's on ResNet-8's activation shapes; ``--profile`` traces
three ``auto`` steps with ``jax.profiler`` and prints the thread time per step of the
synchronous kernels by kind (the convolutions run asynchronously and are not in it).
(``xla_barrier`` differs from ``xla`` only in a program that differentiates through an
activation, so it has no per-layer column.)
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


# Compiler options that give the convolutions to another library than Eigen (on top of the CPU options).
LIBRARY_OPTIONS = {
  "xnn_conv": {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
  "ynn_conv": {
    "xla_cpu_experimental_ynn_fusion_type": _cpu.CPU_CONV_OPTIONS["xla_cpu_experimental_ynn_fusion_type"]
    + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
  },
}


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


def _step_args(model, tx, batch: int):
  x = jnp.asarray(np.random.default_rng(0).random((batch, 32, 32, 3), np.float32))
  variables = model.init(jax.random.key(0), x[:1])
  y = jnp.zeros((batch,), jnp.int32)
  return (variables["params"], variables["batch_stats"], tx.init(variables["params"]), x, y, jax.random.key(1), None)


def steps(batch: int, repeats: int, model_name: str = "resnet8", library_options: bool = False) -> None:
  tx = optax.adam(1e-3)
  # (row name, conv_impl, compiler options on top of the CPU options; None: the training programs' own).
  variants = [(impl, impl, None) for impl in ("xla", "xla_barrier", "patches", "auto")]
  if library_options:
    variants += [(f"auto+{name}", "auto", extra) for name, extra in LIBRARY_OPTIONS.items()]
  programs = {}
  for name, impl, extra in variants:
    model = models.get_model(model_name, 10).clone(conv_impl=impl)
    fn = functools.partial(_member_step, model, tx, None)
    step = _jit(fn) if extra is None else jax.jit(fn, compiler_options={**_cpu.CPU_CONV_OPTIONS, **extra})
    args = _step_args(model, tx, batch)
    jax.block_until_ready(step(*args))
    programs[name] = step, args
  x = programs["auto"][1][3]
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


def batch_norm(repeats: int, batch: int) -> None:
  """flax BatchNorm (training) + ReLU, forward and forward + backward, against torch's."""
  import flax.linen as nn  # noqa: PLC0415

  for hwc in ((32, 32, 16), (16, 16, 32), (8, 8, 64)):
    x = jnp.asarray(np.random.default_rng(0).random((batch, *hwc), np.float32))
    g = jnp.asarray(np.random.default_rng(1).random((batch, *hwc), np.float32))
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
    v = bn.init(jax.random.key(0), x)

    def f(params, x, v=v, bn=bn):
      y, _ = bn.apply({"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
      return jax.nn.relu(y)

    fwd = _jit(f)
    both = _jit(lambda p, x, g, f=f: jax.vjp(f, p, x)[1](g))
    cells = [_median_ms(fwd, v["params"], x, repeats=repeats), _median_ms(both, v["params"], x, g, repeats=repeats)]
    line = (
      f"batch norm + ReLU {batch}x" + "x".join(map(str, hwc)) + ": JAX fwd {:.2f} / fwd+bwd {:.2f} ms".format(*cells)
    )
    if _torch():
      tx_, tg = (torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy()) for a in (x, g))
      tbn = torch.nn.BatchNorm2d(hwc[-1])

      def t_fwd(tx_=tx_, tbn=tbn):
        with torch.no_grad():
          return torch.relu(tbn(tx_))

      def t_both(tx_=tx_, tg=tg, tbn=tbn):
        xx = tx_.detach().requires_grad_(True)
        return torch.autograd.grad(torch.relu(tbn(xx)), [xx, *tbn.parameters()], tg)

      t_ms = _median_ms(t_fwd, repeats=repeats), _median_ms(t_both, repeats=repeats)
      line += f"; torch fwd {t_ms[0]:.2f} / fwd+bwd {t_ms[1]:.2f} ms"
    print(line)


def profile(batch: int, model_name: str) -> None:
  """Thread time per ``auto`` training step of the synchronous kernels, by kind (jax.profiler)."""
  import collections  # noqa: PLC0415
  import glob  # noqa: PLC0415
  import gzip  # noqa: PLC0415
  import json  # noqa: PLC0415
  import tempfile  # noqa: PLC0415

  tx = optax.adam(1e-3)
  model = models.get_model(model_name, 10)
  step = _jit(functools.partial(_member_step, model, tx, None))
  args = _step_args(model, tx, batch)
  for _ in range(2):
    jax.block_until_ready(step(*args))
  n = 3
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(n):
        jax.block_until_ready(step(*args))
    (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  kinds = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or "dur" not in e or name.startswith("$") or "ThunkExecutor" in name or "Pjit" in name:
      continue
    kind = next((k for k in ("transpose", "ynn", "conv", "dot") if k in name), "elementwise and other loops")
    kinds[kind] += e["dur"]
  total = sum(kinds.values())
  print(f"{model_name} auto step, B={batch}: {total / n / 1e3:.1f} ms of synchronous kernels (thread time) per step")
  for kind, us in kinds.most_common():
    print(f"  {kind}: {us / n / 1e3:.1f} ms")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per program (default: %(default)s)")
  p.add_argument("--skip-layers", action="store_true", help="time only the training steps")
  p.add_argument("--models", nargs="+", default=["resnet8"], choices=["resnet8", "cnn"], help="(default: %(default)s)")
  p.add_argument("--library-options", action="store_true", help="also the auto step under LIBRARY_OPTIONS")
  p.add_argument("--batch-norm", action="store_true", help="also batch norm + ReLU against torch's")
  p.add_argument("--profile", action="store_true", help="also a profile of each model's auto step")
  a = p.parse_args()
  if not a.skip_layers:
    layers(a.batch, a.repeats)
  for name in a.models:
    steps(a.batch, a.repeats, name, a.library_options)
  if a.batch_norm:
    batch_norm(max(a.repeats, 15), a.batch)
  if a.profile:
    for name in a.models:
      profile(a.batch, name)


if __name__ == "__main__":
  main()
