"""SecureMark-DL privacy partitioning: attacks against no / single / multiple defenders (Tables I-II, Fig. 4).

Examples (times on a shared 2-core CPU):

  # CI-sized run: 4 owners, 400 images, a 64-unit MLP, two inverse networks (~30 s).
  python experiments/partition.py tables --preset smoke --workdir runs/partition-smoke

  # The study: the paper's 5-layer 900-unit MLP split after layer 2, 20 owners, 4,000 embedded
  # Fashion-MNIST images, 4 epochs (1 warm-up), the single defender at weights 0.03 / 0.1 / 0.3,
  # the four designs of Table II, seven inverse networks and the optimisation attack.
  jipguard partition tables --workdir runs/partition-tables

  # The conv settings: the LFW CNN (width 1/4) split at pool1, pool2 and pool3 on 32x32 colour
  # Fashion-MNIST (offline), 4 owners, no / single defender and a fingerprinted single one, a
  # mirror and a dense inverse network and the optimisation attack (55 min on the loaded machine).
  jipguard partition conv --workdir runs/partition-conv
  # VGG-19-BN (width 1/8) at pool2, as the paper's CIFAR-10 setting; --dataset cifar10 reads tfds.
  jipguard partition conv --preset vgg --workdir runs/partition-conv-vgg
  # CI-sized conv run (the LFW CNN on 16x16 images, all four settings; ~100 s).
  jipguard partition conv --preset smoke --workdir runs/partition-conv-smoke

Expected: with no defender every inverse network reconstructs well (MSE ~0.02-0.04, SSIM ~0.4-0.6);
with defenders MSE rises several-fold and SSIM falls towards 0, at a cost in accuracy
(docs/partition.md lists the numbers measured with these commands). In the conv settings a
deeper split point costs accuracy and leaves the dense attack less to reconstruct.
"""

import sys

from jipguard.partition import cli

if __name__ == "__main__":
  sys.exit(cli.main())
