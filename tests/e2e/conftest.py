"""e2e fixtures: a real server on a tiny model, shared per module, always stopped."""

from __future__ import annotations

import pytest
from server_process import ServerProcess


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = ServerProcess(tiny_llama, "--enable-metrics", "--page-size", "4", "--max-running-requests", "64")
    yield srv
    srv.stop()
