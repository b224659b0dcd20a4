"""jipguard: JAX implementations of dataset intellectual-property protection.

A ground floor (``data``, ``models``, ``sharding``, ``distributed``, ``rundir``, ``sweep``, ``cli``
and the stacked ensembles of ``ensemble``) under one sub-package per paper: ``ipprotect`` (secure
data valuation by per-image sanitization, and the attacks on it), ``watermark`` (anti-neuron
watermarking), ``fingerprint`` (SecureMark-DL's anti-collusion fingerprints), ``partition``
(SecureMark-DL's privacy partitioning) and ``authorization`` (dataset authorization control).
The ground floor never imports a paper, and a paper never imports another; ``jipguard.__main__``
names every command (``jipguard <command>``).
"""

__version__ = "0.1.0"
