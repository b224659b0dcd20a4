"""``jipguard partition <study> [flags]``: SecureMark-DL privacy partitioning studies.

Sub-commands: ``tables``: Tables I-II (the MNIST setting: attacks against no / single /
multiple defenders, the single defender's weight swept); ``conv``: the conv settings (the LFW
CNN or VGG-19-BN split at pool1 / pool2 / pool3; no / single / multiple defenders and a
fingerprinted single one, against conv and dense inverse networks and the optimisation attack).
``--preset smoke`` is a CI-sized run (under a minute). Each field of the study's config is a flag
with the config's default.
"""

from __future__ import annotations

import dataclasses
import os

from jipguard import cli
from jipguard.partition import convstudy, study

STUDIES = {
  "tables": (study.StudyConfig, study.run, study.PRESETS, "Tables I-II: no / single / multiple defenders vs attacks"),
  "conv": (convstudy.ConvStudyConfig, convstudy.run, convstudy.PRESETS, "conv settings: a conv net split at a pool"),
}


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="jipguard partition", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True, parser_class=cli.ArgumentParser)
  for name, (cls, _, presets, help_) in STUDIES.items():
    q = sub.add_parser(name, help=help_, description=help_)
    cli.add_common_flags(q, workdir_help=f"run directory (default: runs/partition-{name}-s<seed>)")
    q.add_argument("--preset", choices=sorted(presets), help="a named setting; flags given override it")
    cli.add_config_flags(q, cls, preset_defaults=True)
  return p


@cli.command
def main(argv: list[str] | None = None) -> int:
  """Runs a study; returns the exit status."""
  a = parser().parse_args(argv)
  cls, run, presets, _ = STUDIES[a.cmd]
  values = dict(presets[a.preset]) if a.preset else {}
  values |= {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if getattr(a, f.name) is not None}
  cfg = cls(**values)  # ValueError names the flag.
  if a.print_config:
    return cli.print_config(cfg)
  workdir = a.workdir or os.path.join("runs", f"partition-{a.cmd}-s{cfg.seed}")
  run(cfg, workdir, progress=not a.quiet)
  print(f"wrote {workdir}/report.md")
  return 0
