"""Shared test configuration: hypothesis profiles, one thread, shared helpers.

Hypothesis profiles (select with the environment variable ``HYPOTHESIS_PROFILE``):

- ``fast`` (default): a handful of examples per property, for everyday runs.
- ``ci``: more examples, for the nightly / CI run.

Both use ``deadline=None``: one example runs a whole inner solve, whose time
depends on the machine, and timing is not what a property test checks.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("fast", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# The test machine is shared; the problems here are tiny, so one thread is also the fastest.
torch.set_num_threads(1)
