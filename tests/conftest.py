"""Test-wide JAX settings: 8 simulated CPU devices for sharding tests, strict ranks."""

import os

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Experiments run in-process by the tests keep their compiled programs in memory only.
os.environ["JIPGUARD_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
