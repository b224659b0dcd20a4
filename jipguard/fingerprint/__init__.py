"""SecureMark-DL fingerprints (Xu, Han, Zhang & Zhang, paper 002): codes, embedding, tracing.

A model vendor fine-tunes one copy of a model per customer, each carrying a fingerprint
``F_j = (p_j || u_j)`` in its weights; from a suspicious (perhaps averaged) model it extracts
the fingerprint and names the customers who colluded.

* ``bibd``: exact (v, k, 1)-BIBDs, PG(2, q) and AG(2, q) for prime powers q, and the paper's.
* ``codes``: AND anti-collusion codes (customer identity codes), two codebooks combined.
* ``tracing``: the host-side decoder with its guarantees (colluders named, innocents never).
* ``embedding``: Eq. 27's regulariser (:class:`Penalty`), theta_sub of layers chosen by a path
  predicate, the secret projection, fingerprints, extraction and bit error rates.
* ``vendor``: per-customer copies fine-tuned from one base as one ensemble; the attacks
  (averaging, magnitude pruning, sparse fine-tuning).

Shape suffixes (``codes_VxN``):

| letter | meaning |
|---|---|
| V | points of a design: the length of one identity code |
| B | blocks of a design |
| N | customers |
| L | a fingerprint: community bits then every codebook's coefficients |
| P | theta_sub: the chosen kernels averaged over output channels, flattened |
| M | customers' copies (ensemble members) |
"""

from jipguard.fingerprint.bibd import Design, affine_plane, is_bibd, paper_design, projective_plane
from jipguard.fingerprint.codes import Codebook, CombinedCodebook, paper_codebook
from jipguard.fingerprint.embedding import Layout, Penalty, Secret, extract, fingerprint_vector
from jipguard.fingerprint.tracing import Decision, decode, decode_coefficients
from jipguard.fingerprint.vendor import average, embed, prune

__all__ = [
  "Codebook",
  "CombinedCodebook",
  "Decision",
  "Design",
  "Layout",
  "Penalty",
  "Secret",
  "affine_plane",
  "average",
  "decode",
  "decode_coefficients",
  "embed",
  "extract",
  "fingerprint_vector",
  "is_bibd",
  "paper_codebook",
  "paper_design",
  "projective_plane",
  "prune",
]
