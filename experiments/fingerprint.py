"""SecureMark-DL fingerprints: BIBD anti-collusion codes, community codes, embedding, tracing.

Examples (times on a shared 2-core CPU):

  # Decoding at code level over all 17,424 customers of two (121,11,1) codebooks, and (49,7,1):
  # no innocent is ever accused; up to 10 (resp. 6) colluders each book decodes exactly (~1 min).
  python experiments/fingerprint.py codes --workdir runs/fp-codes

  # Community codes on a planted 8-community graph, 15-60 bits (Fig. 5; ~2 min).
  python experiments/fingerprint.py crc --workdir runs/fp-crc

  # 16 fingerprinted MLP copies on the embedded Fashion-MNIST subset, attacked by averaging,
  # fine-tuning and pruning (Figs. 6-9, Table III; ~10 min). Resumes if interrupted.
  python experiments/fingerprint.py collusion --workdir runs/fp-collusion

  # A suspicious model (or several, averaged) -> the named colluders or "undecidable".
  python experiments/fingerprint.py trace --workdir runs/fp-collusion \
      --model runs/fp-collusion/models/customer_<id>.npz --model runs/fp-collusion/models/customer_<id2>.npz

Expected: docs/fingerprint.md lists the numbers measured with these commands.
"""

import sys

from jipguard.fingerprint import cli

if __name__ == "__main__":
  sys.exit(cli.main())
