"""SecureMark-DL privacy partitioning: attacks against no / single / multiple defenders (Tables I-II).

Examples (times on a shared 2-core CPU):

  # CI-sized run: 4 owners, 400 images, a 64-unit MLP, two inverse networks (~30 s).
  python experiments/partition.py tables --preset smoke --workdir runs/partition-smoke

  # The study: the paper's 5-layer 900-unit MLP split after layer 2, 20 owners, 4,000 embedded
  # Fashion-MNIST images, 4 epochs (1 warm-up), the single defender at weights 0.03 / 0.1 / 0.3,
  # the four designs of Table II, seven inverse networks and the optimisation attack.
  jipguard partition tables --workdir runs/partition-tables

Expected: with no defender every inverse network reconstructs well (MSE ~0.02-0.04, SSIM ~0.4-0.6);
with defenders MSE rises several-fold and SSIM falls towards 0, at a cost in accuracy
(docs/partition.md lists the numbers measured with these commands).
"""

import sys

from jipguard.partition import cli

if __name__ == "__main__":
  sys.exit(cli.main())
