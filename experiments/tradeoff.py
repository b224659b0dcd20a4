"""IP exposure vs utility trade-off study (IPProtect paper, section VI-C: Fig. 2 and Table III; ``jipguard tradeoff``).

    python experiments/tradeoff.py --preset smoke --workdir runs/tradeoff-smoke   # minutes
    python experiments/tradeoff.py                                            # default preset
    python experiments/tradeoff.py --dataset fashion_mnist --omega_tr 10 50 --seeds 0

IPProtect at several |Omega_Tr| and every baseline (Identity, Random, InstaHide k, DP-MERF
sigma), each scored by utility MAE and image / training / inference IP exposure
(``jipguard.ipprotect.tradeoff``). Writes config.json, table3.md / .json, fig2*.png and one
resumable file per point under points/. Run times and results: docs/exposure.md.
"""

import sys

from jipguard.ipprotect import cli

if __name__ == "__main__":
  sys.exit(cli.tradeoff_main(description=__doc__))
