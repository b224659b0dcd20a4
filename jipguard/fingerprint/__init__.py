"""SecureMark-DL fingerprints (Xu, Han, Zhang & Zhang, paper 002): codes, embedding, tracing.

A model vendor fine-tunes one copy of a model per customer, each carrying a fingerprint
``F_j = (p_j || u_j)`` in its weights; from a suspicious (perhaps averaged) model it extracts
the fingerprint and names the customers who colluded.

* ``bibd``: exact (v, k, 1)-BIBDs, PG(2, q) and AG(2, q) for prime powers q, and the paper's.
* ``codes``: AND anti-collusion codes (customer identity codes), two codebooks combined.
* ``tracing``: the host-side decoder with its guarantees (colluders named, innocents never).

Shape suffixes (``codes_VxN``):

| letter | meaning |
|---|---|
| V | points of a design: the length of one identity code |
| B | blocks of a design |
| N | customers |
| L | coefficients of all codebooks side by side |
"""

from jipguard.fingerprint.bibd import Design, affine_plane, is_bibd, paper_design, projective_plane
from jipguard.fingerprint.codes import Codebook, CombinedCodebook, paper_codebook
from jipguard.fingerprint.tracing import Decision, decode, decode_coefficients

__all__ = [
  "Codebook",
  "CombinedCodebook",
  "Decision",
  "Design",
  "affine_plane",
  "decode",
  "decode_coefficients",
  "is_bibd",
  "paper_codebook",
  "paper_design",
  "projective_plane",
]
