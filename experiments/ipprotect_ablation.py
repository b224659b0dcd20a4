"""Ablation of the IPProtect sanitizer: variants of the main job's flags, over seeds (``jipguard ablation``).

    python experiments/ipprotect_ablation.py --workdir runs/ablation --seeds 0 1 2
    python experiments/ipprotect_ablation.py --workdir runs/ablation --seeds 0 --only "probs, lr 0.1" kl

The variants are ``jipguard.ipprotect.ablation.VARIANTS``; every run directory resumes. Writes
ablation.md / .csv / .json (mean +- sample std over seeds). Results: docs/ipprotect.md.
"""

import sys

from jipguard.ipprotect import cli

if __name__ == "__main__":
  sys.exit(cli.ablation_main(description=__doc__))
