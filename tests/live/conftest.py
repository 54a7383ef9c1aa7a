"""The live acceptance tests need root, ip and tcpreplay: skip with the reason without them,
fail instead under SIPSNIFF_REQUIRE_SERVERS=1 (as every real-peer test)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.live.netns import VethPair, missing_tools


def require_live() -> None:
    """Skip (or fail under SIPSNIFF_REQUIRE_SERVERS=1) when the kernel plumbing is out of reach."""
    missing = missing_tools()
    if missing:
        reason = f"live acceptance needs {', '.join(missing)}"
        if os.environ.get("SIPSNIFF_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{reason}, and SIPSNIFF_REQUIRE_SERVERS=1 forbids skipping")
        pytest.skip(reason)


@pytest.fixture
def veth() -> Iterator[VethPair]:
    """A veth pair between two namespaces of this test's own, deleted afterwards."""
    require_live()
    with VethPair() as pair:
        yield pair
