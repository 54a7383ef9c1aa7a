from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.capture.links import Links, require_root


@pytest.fixture
def links() -> Iterator[Links]:
    require_root()
    pair = Links(2)
    try:
        yield pair
    finally:
        pair.close()
