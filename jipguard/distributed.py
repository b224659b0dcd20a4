"""Multi-host runs: ``jax.distributed`` start-up, host copies of global arrays, process 0.

One program runs on every host (multi-controller JAX). After :func:`initialize`,
``jax.devices()`` lists the devices of all hosts, ``sharding.make_mesh`` spans them, and
jitted functions on arrays placed with ``NamedSharding`` run across hosts; every process
passes the same host arrays to ``jax.device_put``, which keeps each host's shards.
Results that a host needs whole (metrics, sanitized images) come back through
:func:`to_host`; only process 0 writes run directories (:func:`is_main_process`).

Where it starts from:

* explicit flags (``--coordinator_address host:port --num_processes N --process_id i``),
  e.g. two processes on one machine, as the tests do;
* a cluster JAX detects by itself (Cloud TPU pods, SLURM with one task per host, Open MPI,
  Kubernetes JobSet): ``--distributed auto`` calls ``jax.distributed.initialize()`` with
  no arguments;
* otherwise nothing happens: a single process with its local devices.

On CPU, cross-process collectives use gloo (``jax_cpu_collectives_implementation``).

:func:`enable_compilation_cache` (flag ``--compilation_cache``, called by
:func:`initialize_from_flags`) keeps XLA's compiled programs on disk, so a second run of the
same configuration, or the next config of a sweep, skips their compilation.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

# Environment variables that mean "a cluster launched this process as one of several".
_CLUSTER_ENV = (
  "SLURM_NTASKS",
  "OMPI_COMM_WORLD_SIZE",
  "TPU_WORKER_HOSTNAMES",
  "JAX_COORDINATOR_ADDRESS",
  "MEGASCALE_COORDINATOR_ADDRESS",
)


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The experiments' multi-host flags."""
  g = parser.add_argument_group("multi-host (jax.distributed)")
  g.add_argument(
    "--distributed",
    choices=("off", "auto", "on"),
    default="off",
    help="'auto': initialise when a cluster environment is detected (TPU pod, SLURM, MPI); "
    "'on': always (with the flags below or JAX's own detection)",
  )
  g.add_argument("--coordinator_address", help="host:port of process 0")
  g.add_argument("--num_processes", type=int, help="number of processes in the job")
  g.add_argument("--process_id", type=int, help="this process's rank, 0..num_processes-1")
  add_compilation_cache_flag(parser)


def add_compilation_cache_flag(parser: argparse.ArgumentParser) -> None:
  """``--compilation_cache`` (see :func:`enable_compilation_cache`), for every experiment."""
  parser.add_argument(
    "--compilation_cache",
    default=default_compilation_cache(),
    help="directory of JAX's persistent compilation cache, or 'off' (default: "
    "$JIPGUARD_COMPILATION_CACHE, else $XDG_CACHE_HOME/jipguard/xla or ~/.cache/jipguard/xla; "
    "$JAX_COMPILATION_CACHE_DIR, when set, takes precedence)",
  )


def default_compilation_cache() -> str:
  """``$JIPGUARD_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/jipguard/xla`` (``~/.cache`` by default)."""
  if "JIPGUARD_COMPILATION_CACHE" in os.environ:
    return os.environ["JIPGUARD_COMPILATION_CACHE"]
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "jipguard", "xla")


def enable_compilation_cache(path: str | os.PathLike | None, min_compile_time_s: float = 0.0) -> str | None:
  """Turns on JAX's persistent compilation cache in ``path``; returns the directory in use.

  Programs that took at least ``min_compile_time_s`` to compile are stored (by default all),
  keyed by their HLO, the backend, the compile options and the jax / jaxlib versions, so a hit
  runs exactly the program a fresh compile would give. Besides its large programs (the
  sanitizer for each batch size compaction reaches, the training epochs), the main job compiles
  ~100 small ones (eager random draws for each seller's label noise, gathers, metrics), 0.05-0.3 s
  each on 2 cores and ~10 s together, which a threshold of 0.5 s left out of the cache. Main job
  (``python experiments/ipprotect.py --omega_tr 100 --anchor_seed 7 --workdir NEW_DIR
  --compilation_cache DIR --quiet``, an empty cache, then the same cache with another workdir):
  with every program cached 144 s then 106 s; with the 0.5 s threshold 140 s then 119 s (sellers
  24.7 -> 19.9 s, sample_models 46.8 -> 43.7 s, sanitization 35.4 -> 34.0 s on the warm run);
  the same metrics throughout; 125 cache entries, 2.1 MB.
  ``$JAX_COMPILATION_CACHE_DIR``, when set, wins (JAX reads it itself; the threshold still applies). ``None``, ``""`` or
  ``"off"`` leave the cache off. Call it before the first compilation.
  """
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR")  # JAX reads it itself.
  if not directory:
    if path is None or str(path) in ("", "off"):
      return None
    directory = os.path.abspath(os.fspath(path))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
  return directory


SIGTERM_MESSAGE = "signal SIGTERM"


def _interrupt(signum: int, frame: Any) -> None:
  del frame
  signal.signal(signum, signal.SIG_IGN)  # Once: a second SIGTERM must not interrupt the save.
  raise KeyboardInterrupt(SIGTERM_MESSAGE)


def interrupt_on_sigterm() -> bool:
  """Makes the first SIGTERM raise KeyboardInterrupt in the main thread (later ones are
  ignored); returns whether it could.

  SIGTERM is what ``kill``, SLURM (at the time limit or on preemption, before SIGKILL),
  Kubernetes and most schedulers send first. Python's default dies on it without unwinding;
  as an exception it lets ``EnsembleTrainer.fit`` save its last finished epoch and every
  ``finally`` run, so a terminated run resumes where it stopped. Schedulers signal every
  process of a job and a parent may forward its own (``experiments/sweep.py``), so a second
  SIGTERM is ignored rather than let it interrupt that save; SIGKILL still ends the process.
  The message of the KeyboardInterrupt is :data:`SIGTERM_MESSAGE`. A no-op outside the main
  thread (signal handlers can only be set there).
  """
  if threading.current_thread() is not threading.main_thread():
    return False
  signal.signal(signal.SIGTERM, _interrupt)
  return True


def detected_cluster() -> bool:
  """Whether the environment says this process is one of several (see module doc)."""
  n = os.environ.get("SLURM_NTASKS") or os.environ.get("OMPI_COMM_WORLD_SIZE")
  if n is not None:
    return int(n) > 1
  return any(v in os.environ for v in _CLUSTER_ENV[2:])


def initialize(
  mode: str = "auto",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Starts ``jax.distributed`` when asked or detected; returns whether it did.

  Args:
    mode: ``"off"`` never, ``"on"`` always, ``"auto"`` when explicit arguments are given
      or :func:`detected_cluster`.
    coordinator_address: ``host:port`` of process 0 (None: JAX detects it).
    num_processes: Processes in the job.
    process_id: This process's rank.

  Raises:
    ValueError: Only some of the three explicit arguments are given, or a bad mode.
  """
  if mode not in ("off", "auto", "on"):
    raise ValueError(f"mode must be 'off', 'auto' or 'on', got {mode!r}")
  explicit = (coordinator_address, num_processes, process_id)
  if any(a is not None for a in explicit) and not all(a is not None for a in explicit):
    raise ValueError("give all of coordinator_address, num_processes and process_id, or none")
  if mode == "off" or (mode == "auto" and explicit[0] is None and not detected_cluster()):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Used by CPU devices only.
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return True


def initialize_from_flags(args: argparse.Namespace) -> bool:
  """:func:`enable_compilation_cache`, then :func:`initialize`, from :func:`add_flags`' flags."""
  enable_compilation_cache(getattr(args, "compilation_cache", None))
  return initialize(
    args.distributed if args.coordinator_address is None else "on",
    args.coordinator_address,
    args.num_processes,
    args.process_id,
  )


def is_main_process() -> bool:
  return jax.process_index() == 0


def to_host(tree: Any) -> Any:
  """Every array of ``tree`` as a numpy array, gathered from all hosts when it spans them."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)
