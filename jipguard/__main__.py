"""``jipguard <command> ...`` (the console script) and ``python -m jipguard <command> ...``.

Each command is named here by the function that runs it; its module is imported only when the
command runs, so ``jipguard --help`` answers without loading JAX. The ``experiments/`` scripts
are thin wrappers of the same functions.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one line of help). A paper adds its commands here.
COMMANDS = {
  "ipprotect": ("jipguard.ipprotect.cli:main", "IPProtect: sanitize a buyer dataset, measure utility and security"),
  "tradeoff": ("jipguard.ipprotect.cli:tradeoff_main", "IPProtect: IP exposure vs utility study (Fig. 2, Table III)"),
  "ablation": ("jipguard.ipprotect.cli:ablation_main", "IPProtect: the sanitizer's ablation"),
  "saturation": ("jipguard.ipprotect.cli:saturation_main", "IPProtect: the saturation diagnostic"),
  "attacks": ("jipguard.ipprotect.attack_study:main", "IPProtect under attack: linkage, reconstruction, defences"),
  "watermark": ("jipguard.watermark.cli:main", "anti-neuron watermarking: mark, verify, and the studies"),
  "fingerprint": ("jipguard.fingerprint.cli:main", "SecureMark-DL: fingerprint codes, embedding, collusion tracing"),
  "partition": ("jipguard.partition.cli:main", "SecureMark-DL: privacy partitioning, defenders and attacks"),
  "authorization": (
    "jipguard.authorization.cli:main",
    "dataset authorization control: keygen, protect, restore, and the study",
  ),
  "sweep": ("jipguard.sweep:main", "a grid of configs of one command, one run directory each"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
  return (
    "usage: jipguard <command> [flags]   (jipguard <command> --help for a command's flags)\n\n"
    "JAX implementations of dataset intellectual-property protection.\n\ncommands:\n" + "\n".join(lines) + "\n"
  )


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage(), end="")
    return 0
  if argv[0] == "--version":
    import jipguard  # noqa: PLC0415 (the version only when asked)

    print(f"jipguard {jipguard.__version__}")
    return 0
  if argv[0] not in COMMANDS:
    print(f"error: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)} (see jipguard --help)", file=sys.stderr)
    return 2
  module, _, function = COMMANDS[argv[0]][0].partition(":")
  sys.argv[0] = f"jipguard {argv[0]}"  # argparse's prog in usage lines.
  return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
