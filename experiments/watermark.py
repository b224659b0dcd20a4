"""Anti-neuron watermarking (paper 003): studies, and the mark / verify tools (``jipguard watermark``).

    # A person marking and checking images:
    python experiments/watermark.py mark --input my.npz --signature 60 --output my_marked.npz
    python experiments/watermark.py verify --model runs/wm-multiuser/model --images my.npz --signature 60

    # Studies (each writes a run directory: config.json, metrics.json, report.md, PNGs, checkpoints/):
    python experiments/watermark.py multiuser        # 24 users x 1% + 100 held-out users, MIA baselines
    python experiments/watermark.py multiuser --lct per_user
    python experiments/watermark.py sweep --vary num_marked     # or signature, model, augment
    python experiments/watermark.py defences                    # magnitude pruning, fine-tuning

Data: Fashion-MNIST (Debian's IDX files; ``--dataset fashion_mnist_subset`` for the embedded
copy) tinted with random per-image colours, or ``cifar10`` through tfds. Rerunning a command
resumes. ``multiuser --epochs 60 --augment flip`` (MLP) matched 0.83 of 24 users and falsely
matched 0.01 of 100 held-out users in 585 s on a loaded 2-core CPU; run times and every study's
results: docs/watermark.md.
"""

import sys

from jipguard.watermark import cli

if __name__ == "__main__":
  sys.exit(cli.main(description=__doc__))
