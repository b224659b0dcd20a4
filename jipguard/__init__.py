"""jipguard: JAX implementations of dataset intellectual-property protection."""

__version__ = "0.1.0"
