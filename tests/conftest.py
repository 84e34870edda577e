"""Test setup: 8 fake CPU devices so every sharding layout can run on one machine."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("GPTJAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache",
                                                   "gptjax"))
