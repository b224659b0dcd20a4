"""Run directories: atomic writes, config.json, refusal of another config, secrets, tables.

Every experiment writes one directory (docs/scaling.md, "Run directories") through this module:

* :func:`write_atomic` (and :func:`write_text`, :func:`write_json`, :func:`write_npz`,
  :func:`save_figure`): a temporary file in the same directory, flushed to disk (fsync),
  then renamed over the target, so a reader sees the old file or the new one, never half of
  one, even when the run is killed or the machine loses power.
* :func:`write_json` writes strict JSON: NaN and infinities become ``null`` (Python's
  ``json`` would write the non-standard tokens ``NaN`` / ``Infinity``).
* :func:`write_config`: ``config.json`` with the configuration, the jipguard and JAX versions
  and the devices; a directory that holds another configuration is refused
  (:class:`ConfigMismatch`, naming the keys that differ), so a rerun resumes only its own work.
* :func:`write_secret` / :func:`read_secret`: files readable by their owner only (mode 0600
  from creation), for anchor secrets and keys; reports name them, never print them.
* :func:`write_table`: one table as markdown (``.md``) and CSV (``.csv``).
* :func:`append_jsonl`: one line of ``metrics.jsonl`` per epoch or batch, flushed to disk, so a
  curve can be plotted while a run goes. A resumed run appends again: the last line of a step
  is the one that counts (:func:`read_jsonl` keeps it).

The ground floor: this module imports no paper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from typing import Any

import jax
import numpy as np

import jipguard

# The process's umask, read once (reading it means setting it), for the files write_atomic makes.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ConfigMismatch(ValueError):
  """A run directory or checkpoint holds the work of another configuration."""


def write_atomic(path: str | os.PathLike, write_fn: Callable[[str], None], *, mode: int | None = None) -> None:
  """Writes ``path`` through ``write_fn(tmp)``: a temporary file in the same directory, fsynced,
  then renamed over ``path`` (atomic on POSIX), and the directory fsynced.

  Args:
    path: The file to write.
    write_fn: Writes the content to the temporary path it is given.
    mode: Permission bits of the file (default: ``0o666`` less the umask, as ``open`` gives).
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
  os.close(fd)
  # mkstemp makes 0600; results are for the rest of a group too, unless a mode is asked for.
  os.chmod(tmp, 0o666 & ~_UMASK if mode is None else mode)
  try:
    write_fn(tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
  """Makes a rename in ``directory`` durable (where the platform allows it)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
  """Writes ``text`` to ``path`` atomically."""

  def _write(tmp):
    with open(tmp, "w") as f:
      f.write(text)

  write_atomic(path, _write, mode=mode)


def strict_json(obj: Any) -> Any:
  """``obj`` with every non-finite float as None and numpy scalars / arrays as Python values."""
  if isinstance(obj, Mapping):
    return {str(k): strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return strict_json(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def dumps(obj: Any) -> str:
  """``obj`` as indented, key-sorted strict JSON (see :func:`strict_json`)."""
  return json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` to ``path`` atomically as strict JSON (NaN / infinity -> null)."""
  write_text(path, dumps(obj))


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """Writes compressed ``arrays`` to ``path`` atomically (``np.savez_compressed``)."""
  write_atomic(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def save_figure(fig: Any, path: str | os.PathLike) -> None:
  """Saves a matplotlib figure atomically as PNG and closes it."""
  import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib only when a figure is written)

  write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
  plt.close(fig)


def read_json(path: str | os.PathLike) -> Any:
  """The JSON document at ``path``; ValueError naming the file if it is not JSON."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from None


# ------------------------------------------------------------------------- configuration


def check_same_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: Any) -> None:
  """Raises :class:`ConfigMismatch` naming the differing keys if two configurations differ.

  ``current`` is compared as it reads back from JSON (tuples as lists, NaN as null).
  """
  current = json.loads(dumps(current))
  if saved != current:
    diff = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
    raise ConfigMismatch(
      f"{where} holds work of a different configuration (differs in {diff}); "
      "use another directory or delete it to start afresh"
    )


def environment() -> dict[str, Any]:
  """The versions and devices a run records next to its configuration."""
  return {
    "jipguard_version": jipguard.__version__,
    "jax_version": jax.__version__,
    "devices": [str(d) for d in jax.devices()],
  }


def fingerprint(cfg: Any, **added: Any) -> dict[str, Any]:
  """``dataclasses.asdict(cfg)`` without the fields in ``added`` (fields added to a config
  later) that still have their default there, so checkpoints and run directories of older
  versions resume."""
  d = dataclasses.asdict(cfg)
  return {k: v for k, v in d.items() if not (k in added and v == added[k])}


def write_config(
  directory: str | os.PathLike,
  config: Mapping[str, Any],
  *,
  ignore: Iterable[str] = (),
  name: str = "config.json",
  write: bool = True,
) -> None:
  """Writes ``<directory>/config.json``: ``{"config": config, versions, devices}``.

  A directory that already holds a config.json is refused unless its ``config`` equals this one
  (:class:`ConfigMismatch`), except for the keys in ``ignore`` (what a study may extend, e.g.
  its seeds: they do not change any finished piece of work); the file is then rewritten with
  the current versions, devices and ignored keys.

  Args:
    directory: The run directory (created if missing).
    config: JSON-able configuration of everything the run's results depend on.
    ignore: Top-level keys of ``config`` that may differ from the saved ones.
    name: File name inside ``directory``.
    write: False on processes other than the one writing the run directory: only checks.
  """
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  ignored = set(ignore)
  if os.path.exists(path):
    saved = read_json(path)
    saved = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(saved, dict):
      raise ConfigMismatch(f"{path} is not a jipguard config.json; use another directory")
    check_same_config(
      {k: v for k, v in saved.items() if k not in ignored},
      {k: v for k, v in config.items() if k not in ignored},
      directory,
    )
  if write:
    write_json(path, {"config": dict(config), **environment()})


def append_jsonl(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
  """Appends ``row`` as one line of strict JSON to ``path`` (``metrics.jsonl``), fsynced.

  A run killed while writing leaves at most a partial last line, which :func:`read_jsonl` skips.
  """
  line = json.dumps(strict_json(row), sort_keys=True, allow_nan=False)
  with open(path, "a") as f:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, *, key: Sequence[str] = ()) -> list[dict[str, Any]]:
  """The rows of a :func:`append_jsonl` file, a partial last line skipped; with ``key`` (field
  names), one row per key value, the last one written (a resumed run's repeat of a step)."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # The partial last line of a killed run.
  if not key:
    return rows
  last = {tuple(r.get(k) for k in key): r for r in rows}
  return list(last.values())


# ------------------------------------------------------------------------------- secrets


def write_secret(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as JSON to a file only its owner can read or write (0600 from creation).

  Refuses to replace an existing file: a secret is drawn once and kept.
  """
  path = os.fspath(path)
  if os.path.exists(path):
    raise FileExistsError(f"{path} already holds a secret; it is never overwritten")
  write_text(path, dumps(obj), mode=0o600)


def read_secret(path: str | os.PathLike) -> Any:
  """Reads a :func:`write_secret` file; PermissionError if others may read it."""
  st = os.stat(path)
  if st.st_mode & 0o077:
    raise PermissionError(
      f"{path} is readable by others (mode {st.st_mode & 0o777:o}); restrict it with `chmod 600 {path}`"
    )
  return read_json(path)


# -------------------------------------------------------------------------------- tables


def _cell(v: Any, fmt: str) -> str:
  if isinstance(v, (float, np.floating)):
    return format(float(v), fmt) if math.isfinite(v) else str(float(v))
  return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, fmt: str = ".4g") -> str:
  """``rows`` as a markdown table with ``columns`` (``|`` in a cell is escaped)."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(c, ""), fmt).replace("|", "\\|") for c in columns) + " |")
  return "\n".join(lines) + "\n"


def write_table(
  path_stem: str | os.PathLike,
  rows: Sequence[Mapping[str, Any]],
  columns: Sequence[str],
  *,
  title: str = "",
  fmt: str = ".4g",
) -> None:
  """Writes ``<path_stem>.md`` (markdown, under ``title``) and ``<path_stem>.csv`` (full precision)."""
  stem = os.fspath(path_stem)
  head = f"# {title}\n\n" if title else ""
  write_text(stem + ".md", head + markdown_table(rows, columns, fmt=fmt))
  write_csv(stem + ".csv", rows, columns)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
  """Writes ``rows`` as CSV (full precision; a missing value is an empty cell), atomically."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(columns)
  for r in rows:
    writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
  write_text(path, buf.getvalue())
