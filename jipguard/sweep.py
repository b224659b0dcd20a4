"""Sweep runner: a grid of configs of one command, one run directory each (``jipguard sweep``).

    # 3 x 2 = 6 IPProtect runs of the smoke preset, one after another:
    jipguard sweep --workdir runs/sweep-omega --grid omega_tr=10,50,100 --grid seed=0,1 \\
        -- --preset smoke --quiet
    jipguard sweep --workdir runs/sweep-omega ... --list           # the configs and their status
    # One config per array task (SLURM; --task_index defaults to $SLURM_ARRAY_TASK_ID):
    sbatch --array=0-5 \\
        --wrap "jipguard sweep --workdir runs/sweep-omega ... --task_index \\$SLURM_ARRAY_TASK_ID"
    # Fewer workers than configs: worker i of n runs configs i, i+n, i+2n, ...
    jipguard sweep ... --task_index 0 --num_tasks 4

Every config is the command's command line (``jipguard <command>``, or a script given by its
path) with the arguments after ``--``, then ``--<name> <value>`` for each grid axis, then
``--workdir <sweep workdir>/<config name>``. A config whose run directory holds ``metrics.json``
(written last by every experiment) is finished and never rerun; an interrupted one
resumes from its own checkpoints. Each run is a separate process (a failure is logged
to ``<out>/logs/<config>.log`` and the sweep goes on); they share a persistent JAX
compilation cache (``<out>/.jax_cache``) so equal programs compile once. At the end
``sweep.json`` and ``sweep.md`` summarise every config's status and headline metrics.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

from jipguard import cli, distributed, rundir

HEADLINE = ("utility_mae", "rank_correlation", "compliance_train", "compliance_val", "correlation_mean", "ssim_mean")


@dataclasses.dataclass(frozen=True)
class Config:
  """One point of the grid."""

  name: str  # Directory name under the sweep's --workdir, e.g. "omega_tr=10,seed=0".
  params: dict[str, str]  # Grid values (as given on the command line).
  argv: tuple[str, ...]  # The experiment's arguments, --workdir included.
  workdir: str


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
  """``["omega_tr=10,50", "seed=0,1"]`` -> ``[("omega_tr", ["10", "50"]), ("seed", ["0", "1"])]``."""
  axes, seen = [], set()
  for spec in specs:
    name, sep, values = spec.partition("=")
    name = name.strip().lstrip("-")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not name or not vals:
      raise ValueError(f"--grid takes NAME=V1,V2,...; got {spec!r}")
    if name in seen:
      raise ValueError(f"grid axis {name!r} given twice")
    if any(c in v for v in vals for c in "/ "):
      raise ValueError(f"grid values may not contain '/' or spaces: {spec!r}")
    seen.add(name)
    axes.append((name, vals))
  return axes


def expand(out: str, axes: list[tuple[str, list[str]]], base: list[str]) -> list[Config]:
  """The cartesian product of the axes, in order (the last axis varies fastest)."""
  configs = []
  for values in itertools.product(*(vals for _, vals in axes)):
    params = {name: v for (name, _), v in zip(axes, values)}
    name = ",".join(f"{k}={v}" for k, v in params.items()) or "base"
    workdir = os.path.join(out, name)
    argv = [*base, *itertools.chain.from_iterable((f"--{k}", v) for k, v in params.items()), "--workdir", workdir]
    configs.append(Config(name, params, tuple(argv), workdir))
  return configs


def is_finished(config: Config) -> bool:
  return os.path.exists(os.path.join(config.workdir, "metrics.json"))


def my_configs(configs: list[Config], task_index: int | None, num_tasks: int | None) -> list[Config]:
  """All configs, or those of one array task (``task_index`` alone: exactly that config)."""
  if task_index is None:
    return configs
  if num_tasks is None:
    if not 0 <= task_index < len(configs):
      raise ValueError(f"task index {task_index} outside the grid's {len(configs)} configs (0..{len(configs) - 1})")
    return [configs[task_index]]
  if not 0 <= task_index < num_tasks:
    raise ValueError(f"task index {task_index} must be in 0..{num_tasks - 1}")
  return configs[task_index::num_tasks]


def run_config(config: Config, command: list[str], out: str, env: dict[str, str]) -> tuple[str, float]:
  """Runs one config in its own process (``command`` + its arguments); returns ``(status, seconds)``."""
  os.makedirs(os.path.join(out, "logs"), exist_ok=True)
  log_path = os.path.join(out, "logs", f"{config.name}.log")
  t = time.perf_counter()
  with open(log_path, "a") as log:
    log.write(f"$ {' '.join([*command, *config.argv])}\n")
    log.flush()
    proc = subprocess.Popen([*command, *config.argv], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
      rc = proc.wait()
    except KeyboardInterrupt as e:
      # Stopped: let the run save its finished work before exiting. A Ctrl-C (SIGINT) reached
      # the whole terminal's process group, the run included; a SIGTERM may have reached this
      # process only (`kill`), so it is passed on (a run ignores a second one while it saves).
      if str(e) == distributed.SIGTERM_MESSAGE and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
      proc.wait()
      raise
  status = "done" if rc == 0 and is_finished(config) else f"failed (exit {rc}, see {log_path})"
  return status, time.perf_counter() - t


def summary(configs: list[Config], statuses: dict[str, str]) -> list[dict[str, Any]]:
  rows = []
  for c in configs:
    row: dict[str, Any] = {
      "name": c.name,
      "params": c.params,
      "workdir": c.workdir,
      "status": statuses.get(c.name, "done" if is_finished(c) else "pending"),
    }
    if is_finished(c):
      with open(os.path.join(c.workdir, "metrics.json")) as f:
        m = json.load(f)
      row["metrics"] = {k: m[k] for k in HEADLINE if k in m}
    rows.append(row)
  return rows


@cli.command
def main(argv: list[str] | None = None, *, description: str | None = None) -> int:
  """``jipguard sweep``: runs (or lists) a grid of configs of one command."""
  argv = list(sys.argv[1:] if argv is None else argv)
  ours, base = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
  p = cli.ArgumentParser(description=description or __doc__)
  p.add_argument(
    "--command",
    default="ipprotect",
    help="the jipguard command of every config (default: %(default)s), or the path of a script that takes "
    "--workdir and writes metrics.json last",
  )
  p.add_argument("--workdir", required=True, help="sweep directory: one run directory per config")
  p.add_argument(
    "--grid",
    action="append",
    default=[],
    metavar="NAME=V1,V2,...",
    help="a grid axis: the command's flag --NAME takes each value (repeatable)",
  )
  p.add_argument(
    "--task_index",
    type=int,
    default=None,
    help="run one array task's share (default: $SLURM_ARRAY_TASK_ID if set, else all configs)",
  )
  p.add_argument(
    "--num_tasks",
    type=int,
    default=None,
    help="with --task_index: the number of array tasks sharing the grid (default: one config each)",
  )
  p.add_argument("--list", action="store_true", help="print the configs and their status; run nothing")
  p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
  a = p.parse_args(ours)

  if a.command.endswith(".py"):
    if not os.path.isfile(a.command):
      raise cli.FlagError(f"--command {a.command}: no such script")
    command = [sys.executable, a.command]
  elif a.command in ("sweep",) or a.command not in _commands():
    raise cli.FlagError(f"--command must be a script path or one of {', '.join(_commands())}, got {a.command!r}")
  else:
    command = [sys.executable, "-m", "jipguard", a.command]
  cli.check_int("--num_tasks", a.num_tasks, lo=1)
  configs = expand(a.workdir, parse_grid(a.grid), base)
  task_index = a.task_index
  if task_index is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
    task_index = int(os.environ["SLURM_ARRAY_TASK_ID"])
  mine = my_configs(configs, task_index, a.num_tasks)
  if a.list:
    for i, c in enumerate(configs):
      print(f"{i:4d}  {'done   ' if is_finished(c) else 'pending'}  {c.name}  ->  {' '.join(c.argv)}")
    return 0

  out = a.workdir
  os.makedirs(out, exist_ok=True)
  distributed.interrupt_on_sigterm()  # A terminated sweep lets its running config save, then stops.
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(out), ".jax_cache"))
  # The jipguard this process runs, also for a source tree that is not installed.
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  statuses, failed = {}, 0
  for i, c in enumerate(mine):
    if is_finished(c):
      statuses[c.name] = "done (skipped: finished before)"
      print(f"[{i + 1}/{len(mine)}] {c.name}: finished before, skipped", flush=True)
      continue
    print(f"[{i + 1}/{len(mine)}] {c.name} ...", flush=True)
    try:
      status, seconds = run_config(c, command, out, env)
    except KeyboardInterrupt as e:
      print(f"[{i + 1}/{len(mine)}] {c.name}: stopped ({e or 'interrupted'}); the same command resumes", flush=True)
      return 130
    statuses[c.name] = status
    failed += status != "done"
    print(f"[{i + 1}/{len(mine)}] {c.name}: {status} in {seconds:.1f} s", flush=True)

  rows = summary(configs, statuses)
  text = " ".join(["jipguard", "sweep", *argv])
  tag = "" if task_index is None else f".task{task_index}"  # Array tasks never write the same file.
  rundir.write_json(os.path.join(out, f"sweep{tag}.json"), {"command": text, "configs": rows})
  keys = [k for k in HEADLINE if any(k in r.get("metrics", {}) for r in rows)]
  table = [{"config": r["name"], "status": r["status"], **r.get("metrics", {})} for r in rows]
  rundir.write_table(os.path.join(out, f"sweep{tag}"), table, ["config", "status", *keys], title=f"Sweep: `{text}`")
  with open(os.path.join(out, f"sweep{tag}.md")) as f:
    print(f.read())
  return 1 if failed else 0


def _commands() -> list[str]:
  """The names of ``jipguard``'s commands (``jipguard.__main__.COMMANDS``)."""
  from jipguard.__main__ import COMMANDS  # noqa: PLC0415 (the dispatcher imports this module's main lazily)

  return list(COMMANDS)
