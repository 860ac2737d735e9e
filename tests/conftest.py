"""Test settings shared by the library's tests."""

from __future__ import annotations

import os

from hypothesis import settings

# CI runs each property test on the same examples every time: a failure there is reproducible and
# never a matter of luck. Locally the examples vary from run to run and find new cases.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
