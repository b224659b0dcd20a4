"""Benchmarks of jipguard's JAX kernels against a PyTorch reference (see README.md)."""
