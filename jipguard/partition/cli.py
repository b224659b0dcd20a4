"""``jipguard partition <study> [flags]``: SecureMark-DL privacy partitioning studies.

Sub-command ``tables``: Tables I-II (attacks against no / single / multiple defenders, the
single defender's weight swept). ``--preset smoke`` is a CI-sized run (~30 s). Each field of
the study's config is a flag with the config's default.
"""

from __future__ import annotations

import dataclasses
import os

from jipguard import cli
from jipguard.partition import study

STUDIES = {"tables": (study.StudyConfig, study.run, "Tables I-II: no / single / multiple defenders vs attacks")}


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="jipguard partition", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True, parser_class=cli.ArgumentParser)
  for name, (cls, _, help_) in STUDIES.items():
    q = sub.add_parser(name, help=help_, description=help_)
    cli.add_common_flags(q, workdir_help=f"run directory (default: runs/partition-{name}-s<seed>)")
    q.add_argument("--preset", choices=sorted(study.PRESETS), help="a named setting; flags given override it")
    cli.add_config_flags(q, cls, preset_defaults=True)
  return p


@cli.command
def main(argv: list[str] | None = None) -> int:
  """Runs a study; returns the exit status."""
  a = parser().parse_args(argv)
  cls, run, _ = STUDIES[a.cmd]
  values = dict(study.PRESETS[a.preset]) if a.preset else {}
  values |= {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if getattr(a, f.name) is not None}
  cfg = cls(**values)  # ValueError names the flag.
  if a.print_config:
    return cli.print_config(cfg)
  workdir = a.workdir or os.path.join("runs", f"partition-{a.cmd}-s{cfg.seed}")
  run(cfg, workdir, progress=not a.quiet)
  print(f"wrote {workdir}/report.md")
  return 0
