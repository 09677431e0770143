"""devicegate installs without a clone: the sdist and the wheel ``python -m build`` makes, each
installed into a fresh virtualenv and run from there.

How, and what it costs (about 20 to 30 seconds on the 2-core CI machine):

- ``python -m build`` makes the sdist, then the wheel from that sdist, so the wheel test covers
  the sdist's own build too. ``CC``, ``CXX`` and ``LDSHARED`` are ``/bin/false`` throughout:
  nothing may need a C compiler.
- A wheelhouse of the dependencies (``pip download`` of the built wheel with every extra, and
  of the setuptools an sdist build needs) is made once per module; every install then runs with
  ``--no-index --find-links``, so it does not reach an index and a missing dependency fails the
  test rather than slipping in.
- Each virtualenv is made ``--without-pip`` and filled by this interpreter's own pip
  (``pip --python``): seconds saved per venv, and the same pip resolving the same wheelhouse.
- What runs in a virtualenv runs from a directory outside the repository, under ``python -I``
  and without ``PYTHONPATH``, and checks that ``devicegate`` came from the virtualenv.

Needs ``build`` (the ``dev`` dependency group, which ``scripts/test`` installs).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
NAME, VERSION = "devicegate", "0.1.0"
# Any attempt to compile fails: pure Python must build without a compiler.
NO_COMPILER = {"CC": "/bin/false", "CXX": "/bin/false", "LDSHARED": "/bin/false"}
# Bounds each step: reaching it is a hang, a failure.
STEP_TIMEOUT = 300

# Run inside each virtualenv: a request through the installed middleware, in process.
CHECK_SCRIPT = """
import asyncio, importlib, json, secrets

import httpx

import devicegate
from devicegate import DeviceAuthMiddleware, GateConfig, TokenIssuer, get_principal


async def app(scope, receive, send):
    who = get_principal(scope)
    body = json.dumps({"kind": who.kind.value, "device": who.instance_id}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def main():
    config = GateConfig(api_keys=secrets.token_urlsafe(32), jwt_secret=secrets.token_urlsafe(32))
    token = TokenIssuer(config).issue(instance_id="device-1").access_token
    transport = httpx.ASGITransport(app=DeviceAuthMiddleware(app, config=config))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        device = {"authorization": f"Bearer {token}", "x-instance-id": "device-1"}
        admitted = await http.get("/", headers=device)
        refused = await http.get("/")
    try:
        importlib.import_module("devicegate.fastapi")
    except ImportError as exc:
        fastapi = str(exc)
    else:
        fastapi = "imported"
    print(json.dumps({
        "file": devicegate.__file__,
        "version": devicegate.__version__,
        "admitted": [admitted.status_code, admitted.json()],
        "refused": [refused.status_code, refused.headers["www-authenticate"]],
        "fastapi": fastapi,
    }))


asyncio.run(main())
"""


def run(command: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``command``; its output, or a failure that shows it."""
    result = subprocess.run(  # noqa: S603 - fixed commands built here
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}",
            pytrace=False,
        )
    return result.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would let the source tree or this venv leak in."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH")
    }
    return {**env, **NO_COMPILER, **extra}


@dataclass(frozen=True)
class Dists:
    wheel: Path
    sdist: Path
    wheelhouse: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory, starts_a_process: None) -> Dists:
    if importlib.util.find_spec("build") is None:
        pytest.fail(
            "tests/test_packaging.py needs `build`: install the dev dependency group "
            "(pip install --group dev), as scripts/test does",
            pytrace=False,
        )
    root = tmp_path_factory.mktemp("packaging")
    out = root / "dist"
    # Build and download with this interpreter's own environment, which has build.
    build_env = {**os.environ, **NO_COMPILER}
    run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=root, env=build_env)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert [path.name for path in wheels] == [f"{NAME}-{VERSION}-py3-none-any.whl"]
    assert [path.name for path in sdists] == [f"{NAME}-{VERSION}.tar.gz"]
    wheelhouse = root / "wheelhouse"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--dest",
            str(wheelhouse),
            f"{wheels[0]}[server,fastapi]",
            "setuptools>=77",  # what an sdist build needs (pyproject.toml's build-system)
        ],
        cwd=root,
        env=build_env,
    )
    for copy in wheelhouse.glob(f"{NAME}-*"):  # only the dependencies
        copy.unlink()
    return Dists(wheels[0], sdists[0], wheelhouse)


def install(root: Path, dists: Dists, *requirements: str) -> Path:
    """A fresh virtualenv in ``root`` with ``requirements`` installed from the built files and
    the wheelhouse alone; its ``bin`` directory."""
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, env=clean_env())
    python = venv / "bin" / "python"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            str(dists.wheelhouse),
            "--find-links",
            str(dists.wheel.parent),
            *requirements,
        ],
        cwd=root,
        env=clean_env(),
    )
    return venv / "bin"


def check_installed(bin_dir: Path, cwd: Path) -> dict[str, Any]:
    """``devicegate --help`` and a request through the installed middleware, from ``cwd``."""
    help_text = run([str(bin_dir / "devicegate"), "--help"], cwd=cwd, env=clean_env())
    for command in ("init", "serve", "token", "verify"):
        assert command in help_text
    script = cwd / "check_install.py"
    script.write_text(CHECK_SCRIPT, encoding="utf-8")
    # -I: no PYTHONPATH, no user site, not even the script's directory on sys.path.
    result: dict[str, Any] = json.loads(
        run([str(bin_dir / "python"), "-I", str(script)], cwd=cwd, env=clean_env())
    )
    site_packages = bin_dir.parent / "lib"
    assert Path(result["file"]).is_relative_to(site_packages), result["file"]
    assert not Path(result["file"]).is_relative_to(REPO)
    assert result["version"] == VERSION  # read from the installed metadata
    assert result["admitted"] == [200, {"kind": "device_token", "device": "device-1"}]
    assert result["refused"] == [401, 'Bearer realm="devicegate"']
    return result


def readme_install_requirement() -> str:
    """The requirement of the README's ``pip install '...[server]'`` line, as written."""
    match = re.search(r"`pip install '(devicegate\[server\])'`", README.read_text(encoding="utf-8"))
    assert match, "README.md no longer shows pip install 'devicegate[server]'"
    return match.group(1)


# --- what the files hold --------------------------------------------------------------------


def test_wheel_is_pure_python_without_tests(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(f"{NAME}-{VERSION}.dist-info/METADATA").decode()
        wheel_info = wheel.read(f"{NAME}-{VERSION}.dist-info/WHEEL").decode()
        entry_points = wheel.read(f"{NAME}-{VERSION}.dist-info/entry_points.txt").decode()
    assert "Root-Is-Purelib: true" in wheel_info
    assert "Tag: py3-none-any" in wheel_info
    compiled = [name for name in names if name.endswith((".so", ".pyd", ".dll", ".c", ".pyx"))]
    assert compiled == []
    # The package and its metadata, nothing else: no tests, benchmarks or scripts.
    assert {name.split("/")[0] for name in names} == {NAME, f"{NAME}-{VERSION}.dist-info"}
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert f"{NAME}/py.typed" in names
    assert f"{NAME}/fastapi.py" in names
    assert "devicegate = devicegate.cli:main" in entry_points
    for extra in ("server", "fastapi"):
        assert f"Provides-Extra: {extra}" in metadata
    assert re.search(r"^Requires-Dist: fastapi>=[\d.]+; extra == \"fastapi\"$", metadata, re.M)
    # The base install stays small (STYLE.md, principle 12).
    base = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)[^;\n]*$", metadata, re.M)
    assert sorted(name.lower() for name in base) == ["anyio", "pyjwt", "starlette"]


def test_sdist_carries_the_source_and_the_typing_marker(dists: Dists) -> None:
    prefix = f"{NAME}-{VERSION}"
    with tarfile.open(dists.sdist) as sdist:
        names = set(sdist.getnames())
    for needed in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "PKG-INFO",
        "src/devicegate/py.typed",
        "src/devicegate/fastapi.py",
        "tests/conftest.py",
    ):
        assert f"{prefix}/{needed}" in names, needed
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]
    assert not [name for name in names if name.endswith((".so", ".pyd", ".c", ".pyx"))]


def test_bench_extra_brings_every_library_the_benchmark_imports(dists: Dists) -> None:
    # The README's benchmark command installs '.[bench]' and nothing else.
    with zipfile.ZipFile(dists.wheel) as wheel:
        metadata = wheel.read(f"{NAME}-{VERSION}.dist-info/METADATA").decode()
    requirements = [
        Requirement(line) for line in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)
    ]

    def brought_by(extra: str) -> set[str]:
        names = set()
        for requirement in requirements:
            marker = requirement.marker
            if marker is None or not marker.evaluate({"extra": extra}):
                continue
            if canonicalize_name(requirement.name) == NAME:
                for inner in requirement.extras:
                    names |= brought_by(inner)
            else:
                names.add(canonicalize_name(requirement.name))
        return names

    base = {canonicalize_name(r.name) for r in requirements if r.marker is None}
    brought = base | brought_by("bench")
    # overhead.py alone: the soak runs the test suite's servers, with the test extra.
    imported = set()
    for path in [REPO / "benchmarks" / "overhead.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.partition(".")[0])
    ours = {NAME, "benchmarks", "tests"}
    libraries = imported - set(sys.stdlib_module_names) - ours
    assert {"cryptography", "litestar", "redis", "uvicorn"} <= libraries  # the scan works
    distributions = packages_distributions()
    missing = {
        module
        for module in libraries
        if not {canonicalize_name(name) for name in distributions.get(module, [])} & brought
    }
    assert missing == set()


# --- installed, then run --------------------------------------------------------------------


def test_readme_install_line_works_from_the_wheel(dists: Dists, tmp_path: Path) -> None:
    requirement = readme_install_requirement()
    # --only-binary: this install must take the wheel, not build the sdist beside it.
    bin_dir = install(tmp_path, dists, "--only-binary", NAME, requirement)
    result = check_installed(bin_dir, tmp_path)
    # FastAPI is not part of [server]: the module says which extra brings it.
    assert "pip install 'devicegate[fastapi]'" in result["fastapi"]


def test_sdist_installs_with_the_fastapi_extra(dists: Dists, tmp_path: Path) -> None:
    # An sdist path with extras: pip builds it (setuptools from the wheelhouse, no compiler).
    bin_dir = install(tmp_path, dists, f"{dists.sdist}[server,fastapi]")
    result = check_installed(bin_dir, tmp_path)
    assert result["fastapi"] == "imported"
    # py.typed beside the installed package, where mypy looks for it.
    typed = run(
        [str(bin_dir / "python"), "-I", "-c", "import devicegate; print(devicegate.__file__)"],
        cwd=tmp_path,
        env=clean_env(),
    )
    assert (Path(typed.strip()).parent / "py.typed").is_file()
