"""Where the sanitizer gets stuck: saturation of the sampled models, and the fit per image (``jipguard saturation``).

    python experiments/ipprotect_saturation.py --dataset fashion_mnist --buyer_size 3000 --omega_tr 10 \\
        --cache_dir runs/fmnist-cache --loss probs --images 300 --checkpoints 50 300 1000

Takes the flags of experiments/ipprotect.py plus --images and --checkpoints, restores the run's
sellers and sampled models (trained if absent) and prints what ``jipguard.ipprotect.saturation``
describes. The finding it supports: docs/ipprotect.md, "Why the probability loss fails".
"""

import sys

from jipguard.ipprotect import cli

if __name__ == "__main__":
  sys.exit(cli.saturation_main(description=__doc__))
