"""Fixtures shared by the single-host tests."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def netem():
    """Skip (with the reason) where an emulated cluster cannot be built: not root, no iproute2."""
    from experiments.netem import NetemUnavailable, check_support

    try:
        check_support()
    except NetemUnavailable as e:
        pytest.skip(f"no emulated cluster here: {e}")
