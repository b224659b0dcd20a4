"""Command-line plumbing every paper's commands share: one-line errors, common flags, checks.

A command is a function ``main(argv=None) -> int`` decorated with :func:`command`. It parses
its flags with :class:`ArgumentParser`, validates every flag before any work (the checks below
raise :class:`FlagError`, naming the flag and its allowed range), and then calls the library.
:func:`command` turns the project's errors (``data.DataError``, ``rundir.ConfigMismatch``,
``ValueError`` of a config's validation, ``OSError`` of a missing or unreadable file,
``FloatingPointError``) into one line ``error: ...`` on stderr and exit status 2; ``--debug``
shows the traceback instead. Every command is reachable as ``jipguard <command> ...``
(``jipguard.__main__``) and through its thin wrapper in ``experiments/``.

Conventions of the flags:

* ``--workdir``: the command's run directory (one name everywhere).
* ``--print_config``: print the resolved config as JSON and exit.
* ``--quiet``: no progress bars. ``--debug``: tracebacks instead of one-line errors.

The ground floor: this module imports no paper.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import functools
import inspect
import math
import sys
import typing
from typing import Any, NoReturn

from jipguard import rundir

EXIT_USAGE = 2  # Bad input, as argparse exits.
EXIT_INTERRUPTED = 130  # 128 + SIGINT.
# What a command reports as one line: the project's errors are these types.
USER_ERRORS = (ValueError, OSError, ArithmeticError, KeyError)


class FlagError(ValueError):
  """A flag's value outside its allowed range (the message names the flag)."""


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose usage errors are one line ``error: ...`` and exit status 2."""

  def __init__(self, *args: Any, **kwargs: Any):
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str) -> NoReturn:
    self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see --help)\n")


def add_common_flags(parser: argparse.ArgumentParser, *, workdir_help: str | None = None) -> None:
  """``--workdir`` (with ``workdir_help``; omitted when None), ``--print_config``, ``--quiet``, ``--debug``."""
  if workdir_help is not None:
    parser.add_argument("--workdir", help=workdir_help)
  parser.add_argument("--print_config", action="store_true", help="print the resolved config as JSON and exit")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def field_help(cls: type) -> dict[str, str]:
  """Each field's comment in a config dataclass's source (``name: type = default  # help``)."""
  out = {}
  for line in inspect.getsource(cls).splitlines():
    name, _, rest = line.strip().partition(":")
    if "#" in rest and name.isidentifier():
      out[name] = rest.split("#", 1)[1].strip().replace("%", "%%")
  return out


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, preset_defaults: bool = False) -> None:
  """One ``--<field>`` per field of the config dataclass ``cls``, typed by its annotation, with the
  field's comment as help (:func:`field_help`) and its default shown. ``preset_defaults``: the
  flags default to None (a preset or the config fills them in; only flags given override it)."""
  hints, helps = typing.get_type_hints(cls), field_help(cls)
  for f in dataclasses.fields(cls):
    kind, help_ = hints[f.name], helps.get(f.name, "")
    if kind is bool:
      default = None if preset_defaults else f.default
      parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_)
      continue
    parser.add_argument(
      f"--{f.name}",
      type={int: int, float: float}.get(kind, str),
      default=None if preset_defaults else f.default,
      help=help_ + (f" (default: {f.default})" if preset_defaults else " (default: %(default)s)"),
    )


def config_from_flags(
  args: argparse.Namespace,
  cls: type,
  *,
  ranges: dict[str, dict[str, Any]] | None = None,
  int_range: dict[str, Any] | None = None,
  float_range: dict[str, Any] | None = None,
) -> Any:
  """The config dataclass ``cls`` from the flags of :func:`add_config_flags`, each numeric flag
  checked first (:func:`check_int` / :func:`check_float`, naming it): with ``ranges[field]`` where
  given, else ``int_range`` / ``float_range`` (default: >= 0, and finite for floats)."""
  ranges = ranges or {}
  int_range = dict(lo=0) if int_range is None else int_range
  float_range = dict(lo=0) if float_range is None else float_range
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if hints[f.name] is int:
      check_int(f"--{f.name}", getattr(args, f.name), **ranges.get(f.name, int_range))
    elif hints[f.name] is float:
      check_float(f"--{f.name}", getattr(args, f.name), **ranges.get(f.name, float_range))
  return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def one_line(err: BaseException) -> str:
  """``err``'s message on one line (its type's name when it has none)."""
  text = " ".join(str(err).split())
  if isinstance(err, KeyError) and len(err.args) == 1:
    text = f"missing key {err.args[0]!r}"
  if isinstance(err, OSError) and err.filename is not None and err.strerror:
    text = f"{err.filename}: {err.strerror}"
  return text or type(err).__name__


def command(fn: Callable[..., int]) -> Callable[..., int]:
  """Wraps a command's ``main(argv=None, ...)``: the errors of :data:`USER_ERRORS` become one line
  ``error: ...`` on stderr and exit status 2 (``--debug`` in argv re-raises them); Ctrl-C says that
  finished work is kept and exits 130."""

  @functools.wraps(fn)
  def wrapped(argv: Sequence[str] | None = None, *args: Any, **kwargs: Any) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
      return fn(argv, *args, **kwargs)
    except USER_ERRORS as err:
      if "--debug" in argv:
        raise
      print(f"error: {one_line(err)}", file=sys.stderr)
      return EXIT_USAGE
    except KeyboardInterrupt:
      if "--debug" in argv:
        raise
      print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
      return EXIT_INTERRUPTED

  return wrapped


def print_config(cfg: Any) -> int:
  """Prints a config (a dataclass or a mapping) as JSON; returns 0 (``--print_config``)."""
  print(rundir.dumps(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg), end="")
  return 0


# ------------------------------------------------------------------------- flag checks


def _fail(flag: str, allowed: str, value: Any) -> NoReturn:
  raise FlagError(f"{flag} must be {allowed}, got {value!r}")


def check_int(flag: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> None:
  """``value`` is an integer in ``[lo, hi]`` (None: unbounded); FlagError naming ``flag`` otherwise."""
  if value is None:
    return
  allowed = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "")
  if lo is not None and hi is not None:
    allowed = f"an integer in [{lo}, {hi}]"
  elif hi is not None:
    allowed += f" <= {hi}"
  if isinstance(value, bool) or not isinstance(value, int):
    _fail(flag, allowed, value)
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    _fail(flag, allowed, value)


def check_float(
  flag: str,
  value: Any,
  *,
  lo: float | None = None,
  hi: float | None = None,
  lo_open: bool = False,
  hi_open: bool = False,
) -> None:
  """``value`` is a finite number in the interval given (open ends where asked); FlagError otherwise."""
  if value is None:
    return
  parts = []
  if lo is not None:
    parts.append(f"{'>' if lo_open else '>='} {lo:g}")
  if hi is not None:
    parts.append(f"{'<' if hi_open else '<='} {hi:g}")
  allowed = "a finite number" + (" " + " and ".join(parts) if parts else "")
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    _fail(flag, allowed, value)
  if lo is not None and (value <= lo if lo_open else value < lo):
    _fail(flag, allowed, value)
  if hi is not None and (value >= hi if hi_open else value > hi):
    _fail(flag, allowed, value)


def check_choice(flag: str, value: Any, choices: Sequence[Any]) -> None:
  """``value`` is one of ``choices``; FlagError listing them otherwise."""
  if value is not None and value not in choices:
    _fail(flag, "one of " + ", ".join(map(str, choices)), value)
