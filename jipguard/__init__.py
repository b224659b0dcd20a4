"""jipguard: JAX implementations of dataset intellectual-property protection.

A ground floor (``data``, ``models``, ``sharding``, ``distributed``, ``rundir``, ``sweep`` and the
stacked ensembles of ``ensemble``) under one sub-package per paper: ``ipprotect`` (secure data
valuation by per-image sanitization) and ``watermark`` (anti-neuron watermarking). The ground
floor never imports a paper, and a paper never imports another.
"""

__version__ = "0.1.0"
