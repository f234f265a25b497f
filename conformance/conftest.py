"""pytest wiring: one Harness per test (`h`), closed at the end of the test,
and the tests that stop a node (marker `stops_node`) moved to the end."""

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


def pytest_collection_modifyitems(session, config, items):
    # A test that stops a node must run after every other test, whatever
    # the file order or selection: stable sort, stops_node last.
    items.sort(key=lambda item: item.get_closest_marker("stops_node") is not None)
