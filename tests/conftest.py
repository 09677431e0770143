from __future__ import annotations

import inspect

import pytest

from tests.helpers import Keys, RecordingApp, fresh_keys


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every async test runs on asyncio and on trio: devicegate uses anyio only.
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.add_marker(pytest.mark.anyio)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def keys() -> Keys:
    return fresh_keys()


@pytest.fixture
def app() -> RecordingApp:
    return RecordingApp()
