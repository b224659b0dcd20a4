"""``jipguard fingerprint <study> [flags]``: the studies, and the vendor's trace tool.

Sub-commands: ``codes`` (decoding at code level, all 17,424 customers), ``crc`` (community codes,
Fig. 5), ``collusion`` (fingerprinted models under averaging, fine-tuning and pruning: Figs. 6-9,
Table III; it also writes every customer's fingerprinted model to ``<workdir>/models/``), and
``trace`` (a suspicious model, or several to average, -> the named colluders or "undecidable").
Each study takes one flag per field of its config, with the config's default.
"""

from __future__ import annotations

import os

from jipguard import cli
from jipguard.fingerprint import collusion, studies

STUDIES = {
  "codes": (
    studies.CodesConfig,
    studies.run_codes,
    "decoding of averaged codes, no training (Figs. 6-7 at code level)",
  ),
  "crc": (studies.CrcStudyConfig, studies.run_crc, "community relationship codes on planted graphs (Fig. 5)"),
  "collusion": (
    collusion.CollusionConfig,
    collusion.run_collusion,
    "fingerprinted copies under averaging, fine-tuning, pruning (Figs. 6-9, Table III)",
  ),
}


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog="jipguard fingerprint", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True, parser_class=cli.ArgumentParser)
  for name, (cls, _, help_) in STUDIES.items():
    q = sub.add_parser(name, help=help_, description=help_)
    cli.add_common_flags(q, workdir_help=f"run directory (default: runs/fp-{name}-s<seed>)")
    cli.add_config_flags(q, cls)
  q = sub.add_parser("trace", help="name the colluders behind a suspicious model")
  cli.add_common_flags(q, workdir_help="the collusion study's run directory (its secret, codebooks and customers)")
  q.add_argument("--model", action="append", required=True, help="a model .npz (repeat to average several)")
  return p


@cli.command
def main(argv: list[str] | None = None) -> int:
  """Runs a study or ``trace``; returns the exit status."""
  a = parser().parse_args(argv)
  if a.cmd == "trace":
    if not a.workdir:
      raise ValueError("--workdir is required: the collusion study's run directory")
    decision = collusion.trace(a.workdir, a.model)
    print(f"{decision.status}: {decision.message}")
    return 0
  cls, run, _ = STUDIES[a.cmd]
  # Seeds, counts and rates are non-negative and finite; the config checks more (ValueError names the flag).
  cfg = cli.config_from_flags(a, cls)
  if a.print_config:
    return cli.print_config(cfg)
  workdir = a.workdir or os.path.join("runs", f"fp-{a.cmd}-s{cfg.seed}")
  kwargs = {"progress": not a.quiet} if a.cmd == "collusion" else {}
  run(cfg, workdir, **kwargs)
  print(f"wrote {workdir}/report.md")
  return 0
