"""Times jipguard's kernels against a PyTorch reference; writes results.json and results.md.

    python benchmarks/run.py --quick --workdir runs/bench-quick   # ~2 min on 2 cores
    python benchmarks/run.py --workdir runs/bench                # full sizes
    python benchmarks/run.py --retable benchmarks/results/X.json  # an old table, current columns

Take timings you report on a quiet machine (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

try:
  import torch  # noqa: E402
except ModuleNotFoundError as e:  # The reference side is an optional dependency.
  raise SystemExit(
    "benchmarks/run.py times jipguard against PyTorch, which is not installed here: "
    "pip install -e '.[bench]' (a CPU build of torch is enough)"
  ) from e

from benchmarks import harness, kernels  # noqa: E402
from jipguard import rundir  # noqa: E402


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small sizes (M=10, short epoch), 3 repeats")
  parser.add_argument(
    "--workdir",
    "--out",  # The name in the commands recorded by results/ before --workdir became jipguard's one name.
    dest="out",
    help="directory for results.json / .md / .csv (required unless --retable)",
  )
  parser.add_argument(
    "--retable",
    metavar="JSON",
    default=None,
    help="print the table of a results.json written earlier with today's targets and "
    "derived columns (target, met, JAX roofline for target); times nothing",
  )
  parser.add_argument("--kernels", nargs="+", default=list(kernels.KERNELS), choices=list(kernels.KERNELS))
  parser.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up (default 5, quick 3)")
  parser.add_argument(
    "--budget-s",
    type=float,
    default=300.0,
    help="per implementation and size: fewer timed runs (>= 1) if repeats x warm-up exceeds it",
  )
  parser.add_argument("--match", default=None, help="only sizes whose label contains this, e.g. 'M=100'")
  parser.add_argument(
    "--precision",
    choices=("fp32", "tf32"),
    default="fp32",
    help="float32 matrix products on a GPU: full fp32 on both sides (default), or TF32 on both",
  )
  args = parser.parse_args(argv)
  if args.retable:
    try:
      rows = json.loads(pathlib.Path(args.retable).read_text())
    except (OSError, ValueError) as e:
      parser.error(f"--retable: cannot read {args.retable}: {e}")
    needed = {"kernel", "size", "ratio", "gflops", "torch_gflops"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and needed <= set(r) for r in rows):
      parser.error(f"--retable: {args.retable} is not a benchmarks results.json (a list of rows with {sorted(needed)})")
    harness.set_targets(rows, kernels.KERNELS)
    harness.add_roofline(rows)
    print("\n".join(harness.table(rows)))
    return
  if not args.out:
    parser.error("--workdir is required (or --retable JSON)")
  repeats = args.repeats or (3 if args.quick else 5)
  # The same arithmetic on both sides: JAX's GPU default is TF32-like, torch's is full fp32 for
  # matmuls but TF32 for convolutions. (No effect on a CPU.)
  tf32 = args.precision == "tf32"
  jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
  torch.backends.cuda.matmul.allow_tf32 = tf32
  torch.backends.cudnn.allow_tf32 = tf32

  torch.set_num_threads(os.cpu_count())
  machine = harness.machine_info([sys.argv[0], *argv])
  # The table so far is rewritten after every row: a run stopped part-way keeps what it timed.
  rows = harness.run(
    kernels.KERNELS,
    args.kernels,
    quick=args.quick,
    repeats=repeats,
    budget_s=args.budget_s,
    match=args.match,
    on_row=lambda rows: harness.write(args.out, rows, machine),
  )
  machine["loadavg_end"] = list(os.getloadavg())
  out = harness.write(args.out, rows, machine)
  rundir.write_text(str(out / "machine.json"), json.dumps(machine, indent=1) + "\n")
  print((out / "results.md").read_text())


if __name__ == "__main__":
  main()
