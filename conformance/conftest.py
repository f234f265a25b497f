"""pytest wiring: one Harness per test (`h`), closed at the end of the test."""

import pytest
import pytest_asyncio

from gwclient import Harness, load_config


@pytest.fixture(scope="session")
def cfg():
    try:
        return load_config()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest_asyncio.fixture
async def h(cfg):
    harness = Harness(cfg)
    try:
        yield harness
    finally:
        await harness.aclose()
