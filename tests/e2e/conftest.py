import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def engines(tiny_model):
    from tests.e2e.harness import EngineCache

    return EngineCache(tiny_model)
