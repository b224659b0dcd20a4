"""IPProtect main job: sanitize a buyer dataset and measure utility and security (``jipguard ipprotect``).

    python experiments/ipprotect.py --omega_tr 100                 # embedded Fashion-MNIST subset
    python experiments/ipprotect.py --preset smoke --workdir runs/smoke   # seconds
    python experiments/ipprotect.py --dataset fashion_mnist --preset paper
    python experiments/ipprotect.py --mesh 1,8                     # images over 8 devices
    python experiments/ipprotect.py --distributed auto --mesh 4,16 # every host of a TPU pod / SLURM job

Writes a run directory (default runs/ipprotect-<dataset>-<preset>-tr<omega_tr>-s<seed>):
config.json, metrics.json, metrics.jsonl, report.md, sanitized.npz, examples.png, sellers.png,
checkpoints/. ``--help`` shows each flag's default under ``--preset``; ``--print_config`` the
resolved config.
Rerunning the same command resumes: trained ensembles are reused and sanitization continues
at the next unfinished batch. Run time and results of the default preset: README.md and
docs/ipprotect.md.
"""

import sys

from jipguard.ipprotect import cli

if __name__ == "__main__":
  sys.exit(cli.main(description=__doc__))
