from __future__ import annotations

import os

import pytest

from devicegate import _auth
from tests.helpers import Keys, RecordingApp, fresh_keys

# Files the tests write get the modes of the usual umask, whatever the machine's: a secrets file
# that others may write is refused (a umask of 002 would make every such file group-writable).
os.umask(0o022)


# Every async test runs on asyncio and on trio (anyio_mode = "auto" in pyproject): devicegate
# uses anyio only. A module for an asyncio-only framework parametrises anyio_backend itself.
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# Every test that builds devicegate in this process runs twice: with the compiled fast path (what
# an install with a C compiler gets) and with pure Python (PyPy, no compiler, or
# DEVICEGATE_NO_EXTENSIONS set). Both must give every answer alike. These modules build no
# authenticator in this process (servers in subprocesses use what the install built), or test
# one path on purpose, and run once.
ONE_PATH = frozenset(
    {
        "test_benchmarks_smoke",
        "test_config",
        "test_credentials",
        "test_principal",
        "test_scripts",
        "test_speedups",
        "test_tokens",
        "test_uvicorn",
    }
)
_COMPILED_BUILT = _auth.FastPath is not None
_PATHS = ["python"] if _auth.EXTENSIONS_DISABLED else ["compiled", "python"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if module not in ONE_PATH and "authentication_path" in metafunc.fixturenames:
        metafunc.parametrize("authentication_path", _PATHS, indirect=True)


@pytest.fixture(autouse=True)
def authentication_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which implementation authenticators built during the test use: "compiled" or "python".

    A build without the compiled module fails the compiled runs rather than skipping them: the
    test environment is built with a compiler, and a silent fallback would test nothing.
    """
    path = str(getattr(request, "param", _PATHS[0]))
    if path == "python":
        monkeypatch.setattr(_auth, "FastPath", None)
    elif not _COMPILED_BUILT:
        pytest.fail("devicegate._speedups is not built: reinstall with a C compiler")
    return path


@pytest.fixture
def keys() -> Keys:
    return fresh_keys()


@pytest.fixture
def app() -> RecordingApp:
    return RecordingApp()
