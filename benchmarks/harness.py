"""Timing, compile-time accounting, machine description and the results files.

Kernels (``kernels.py``) use :func:`time_calls` and :func:`jax_compile_seconds` and
return one row (a dict) per size; :func:`run` runs the chosen kernels, adds the
roofline fractions and :func:`write` writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from jipguard import rundir

Row = dict[str, Any]

# Events JAX records while turning a traced function into an executable.
_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)
_compile_totals: collections.Counter[str] = collections.Counter()


def _on_event_duration(event: str, duration_secs: float, **_: Any) -> None:
  if event in _COMPILE_EVENTS:
    _compile_totals[event] += duration_secs


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


class CompileClock:
  """Seconds JAX spent tracing, lowering and compiling inside a ``with`` block."""

  seconds: float = 0.0


@contextlib.contextmanager
def jax_compile_seconds() -> Iterator[CompileClock]:
  """Measures JAX compilation (trace + lower + XLA compile) inside the block."""
  clock = CompileClock()
  before = sum(_compile_totals.values())
  try:
    yield clock
  finally:
    clock.seconds = sum(_compile_totals.values()) - before


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall times of one implementation.

  Attributes:
    warmup_s: The first (warm-up) call; for JAX it includes compilation.
    times_s: The timed calls after the warm-up.
  """

  warmup_s: float
  times_s: tuple[float, ...]

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)


def time_calls(fn: Callable[[], Any], repeats: int, budget_s: float | None = None) -> Timing:
  """One warm-up call of ``fn`` then ``repeats`` timed calls; ``fn`` must block until done.

  With ``budget_s``, fewer timed calls (at least one) are made when ``repeats`` calls as
  long as the warm-up would exceed it.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  t0 = time.perf_counter()
  fn()
  warmup = time.perf_counter() - t0
  if budget_s is not None:
    repeats = max(1, min(repeats, int(budget_s // max(warmup, 1e-9))))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return Timing(warmup, tuple(times))


def make_row(
  kernel: str,
  size: str,
  flops: float,
  jax_t: Timing,
  jax_compile_s: float,
  torch_func: Timing | None,
  torch_loop: Timing | None,
  **extra: Any,
) -> Row:
  """The common row: medians, the best torch variant, ratio and achieved GFLOP/s."""
  torch_times = {k: t.median_s for k, t in (("func", torch_func), ("loop", torch_loop)) if t is not None}
  best = min(torch_times, key=torch_times.get)
  jax_s, torch_best_s = jax_t.median_s, torch_times[best]
  return {
    "kernel": kernel,
    "size": size,
    "jax_s": jax_s,
    "jax_compile_s": jax_compile_s,
    "torch_func_s": torch_times.get("func"),
    "torch_loop_s": torch_times.get("loop"),
    "torch_best_s": torch_best_s,
    "torch_best": best,
    "ratio": jax_s / torch_best_s,
    "flops": flops,
    "gflops": flops / jax_s / 1e9,
    "torch_gflops": flops / torch_best_s / 1e9,
    "repeats": max(len(t.times_s) for t in (jax_t, torch_func, torch_loop) if t is not None),
    "jax_times_s": list(jax_t.times_s),
    "torch_func_times_s": list(torch_func.times_s) if torch_func else None,
    "torch_loop_times_s": list(torch_loop.times_s) if torch_loop else None,
    **extra,
  }


def add_roofline(rows: list[Row], roofline_kernel: str = "gemm_roofline") -> None:
  """Adds ``roofline_fraction`` (JAX), ``torch_roofline_fraction`` and
  ``roofline_for_target`` to every row.

  The roofline is the best GEMM GFLOP/s measured by either framework in this run
  (rows of ``roofline_kernel``); without such rows the fractions are None.

  ``roofline_for_target`` is the JAX roofline fraction at which a row's ratio would equal
  its ``target`` (when it has one): ``ratio = torch_roofline_fraction / roofline_fraction``
  at equal FLOPs, so it is ``torch_roofline_fraction / target``. Above 1 the target asks
  for more than the machine's GEMM rate on every FLOP: it cannot be met without doing fewer
  FLOPs than the PyTorch reference.
  """
  peaks = [max(r["gflops"], r["torch_gflops"]) for r in rows if r["kernel"] == roofline_kernel]
  peak = max(peaks) if peaks else None
  for r in rows:
    r["roofline_gflops"] = peak
    r["roofline_fraction"] = r["gflops"] / peak if peak else None
    r["torch_roofline_fraction"] = r["torch_gflops"] / peak if peak else None
    target = r.get("target")
    r["roofline_for_target"] = r["torch_roofline_fraction"] / target if peak and target else None


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info(command: Sequence[str]) -> dict[str, Any]:
  """CPU, cores, thread settings, library versions, date, load and the command."""
  import jaxlib  # noqa: PLC0415
  import torch  # noqa: PLC0415

  return {
    "cpu": _cpu_model(),
    "cores": os.cpu_count(),
    "torch_threads": torch.get_num_threads(),
    "jax_devices": [str(d) for d in jax.devices()],
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "torch": torch.__version__,
    "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    "jax_matmul_precision": str(jax.config.jax_default_matmul_precision),
    "torch_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    "numpy": np.__version__,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "loadavg": list(os.getloadavg()),
    "command": " ".join(["python", *command]),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def run(
  kernels: dict[str, Any],
  names: Sequence[str],
  *,
  quick: bool,
  repeats: int,
  budget_s: float | None = None,
  match: str | None = None,
  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
  on_row: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
  """Rows of every size of every kernel in ``names`` (in registry order), with rooflines.

  Args:
    kernels: The registry (``kernels.KERNELS``).
    names: Kernels to run.
    quick: Run the kernels' quick sizes.
    repeats: Timed calls per implementation after the warm-up.
    budget_s: Cut the timed calls of one implementation to fit this (at least one).
    match: Only sizes whose label contains this substring (kernels' sizes are kept
      whole for ``gemm_roofline``, which every row is compared against).
    log: Progress messages.
    on_row: Called with the rows so far (rooflines added) after each row, e.g. to write them,
      so a run that is killed keeps the rows it finished.
  """
  unknown = sorted(set(names) - set(kernels))
  if unknown:
    raise ValueError(f"unknown kernels {unknown}; choose from {sorted(kernels)}")
  rows = []
  for name in (k for k in kernels if k in names):
    for size in kernels[name].sizes(quick):
      if match and match not in size.label and name != "gemm_roofline":
        continue
      log(f"[{name}] {size.label} ...")
      t0 = time.perf_counter()
      row = kernels[name].row(size, repeats, budget_s)
      log(
        f"[{name}] {size.label}: jax {row['jax_s']:.4g} s, torch {row['torch_best_s']:.4g} s "
        f"({row['torch_best']}), ratio {row['ratio']:.3g}  [{time.perf_counter() - t0:.1f} s]"
      )
      set_targets([row], kernels)
      rows.append(row)
      if on_row is not None:
        add_roofline(rows)
        on_row(rows)
  add_roofline(rows)
  return rows


def _fmt(v: Any, digits: int = 3) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "ok" if v else "FAIL"
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v).replace("|", "\\|")  # Labels such as "|Omega_Tr|" must not split a table cell.


_COLUMNS = [
  ("kernel", "kernel"),
  ("size", "size"),
  ("jax_s", "JAX s"),
  ("jax_compile_s", "JAX compile s"),
  ("torch_func_s", "torch func s"),
  ("torch_loop_s", "torch loop s"),
  ("ratio", "ratio"),
  ("gflops", "JAX GFLOP/s"),
  ("torch_gflops", "torch GFLOP/s"),
  ("roofline_fraction", "JAX roofline"),
  ("torch_roofline_fraction", "torch roofline"),
  ("target", "target"),
  ("met", "met"),
  ("roofline_for_target", "JAX roofline for target"),
  ("check_max_rel_err", "check rel err"),
]


def table(rows: list[Row]) -> list[str]:
  """The markdown table of ``rows`` (header included), one line per row."""
  return ["| " + " | ".join(h for _, h in _COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"] + [
    "| " + " | ".join(_fmt(r.get(k)) for k, _ in _COLUMNS) + " |" for r in rows
  ]


def set_targets(rows: list[Row], kernels: dict[str, Any]) -> None:
  """Sets every row's ``target`` (its kernel's, None without one) and ``met`` (ratio <= target)."""
  for r in rows:
    r["target"] = getattr(kernels.get(r["kernel"]), "target", None)
    r["met"] = r["ratio"] <= r["target"] if r["target"] else None


def markdown(rows: list[Row], machine: dict[str, Any]) -> str:
  """The results table and the machine it ran on."""
  lines = ["# jipguard benchmarks: JAX vs PyTorch reference", "", *table(rows)]
  peak = rows[0].get("roofline_gflops") if rows else None
  busy = machine["loadavg"][0]  # At the start: at the end it includes this run.
  if busy > 0.25 * (machine["cores"] or 1):
    lines += [
      "",
      f"**Not a quiet machine** (1-min load average {busy:.2f} on {machine['cores']} cores at the "
      "start): these timings are not fit to report; torch's OpenMP threads slow down most under contention.",
    ]
  notes = [f"- {r['kernel']} {r['size']}: {r['summary']}" for r in rows if r.get("summary")]
  if notes:
    lines += ["", "Notes:", "", *notes]
  lines += [
    "",
    "Times are medians of the timed repeats after one warm-up run (JAX's warm-up compiles;",
    "`JAX compile s` is the tracing + lowering + XLA compile time inside it).",
    "`ratio` = JAX s / best torch s (< 1: JAX is faster). `torch func` is `torch.func`",
    "(vmap over stacked members; for GEMM rows, the batched call), `torch loop` a Python loop",
    "over members (for GEMM rows, one `torch.mm` per matrix).",
    f"`roofline` = achieved GFLOP/s / best GEMM GFLOP/s of this run ({_fmt(peak, 4)} GFLOP/s).",
    "`target`: the performance goal for the 2-core CPU (`met`: ratio <= target).",
    "`JAX roofline for target` = torch roofline / target: the JAX roofline fraction at which",
    "the ratio would equal the target at the same FLOPs; above 1 no implementation of these",
    "FLOPs can meet it on this machine (it would need more than the GEMM rate on every FLOP).",
    "`check rel err`: largest relative difference of the per-member losses of JAX and both",
    "torch references from the same initial weights on the same batches (must be < 1e-3).",
    "",
    "## Machine",
    "",
    f"- CPU: {machine['cpu']}, {machine['cores']} cores (os.cpu_count())",
    f"- torch threads: {machine['torch_threads']} (`torch.set_num_threads(os.cpu_count())`); "
    "JAX: XLA's CPU thread pool (all cores); devices: " + ", ".join(machine["jax_devices"]),
    *(
      [
        f"- accelerator: {machine['torch_device']} (both frameworks); float32 matrix products: JAX "
        f"`{machine['jax_matmul_precision']}`, torch TF32 {'on' if machine['torch_allow_tf32'] else 'off'}"
      ]
      if machine.get("torch_device", "cpu") != "cpu"
      else []
    ),
    f"- python {machine['python']}, jax {machine['jax']}, jaxlib {machine['jaxlib']}, "
    f"torch {machine['torch']}, numpy {machine['numpy']}",
    f"- date: {machine['date']}",
    f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in machine['loadavg'])}; "
    f"at end (includes this run): {', '.join(f'{x:.2f}' for x in machine.get('loadavg_end', []))}",
    f"- command: `{machine['command']}`"
    + (f" with `XLA_FLAGS={machine['xla_flags']}`" if machine.get("xla_flags") else ""),
    "",
  ]
  return "\n".join(lines)


def write(out_dir: str | os.PathLike, rows: list[Row], machine: dict[str, Any]) -> pathlib.Path:
  """Writes ``results.json`` (the rows), ``results.md`` and ``results.csv`` into ``out_dir``, each atomically;
  returns it."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  rundir.write_text(str(out / "results.json"), json.dumps(rows, indent=1) + "\n")
  rundir.write_text(str(out / "results.md"), markdown(rows, machine))
  rundir.write_csv(str(out / "results.csv"), rows, [k for k, _ in _COLUMNS])
  return out
