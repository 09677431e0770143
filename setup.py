"""Build the optional C fast path; everything else is declared in pyproject.toml.

The extension is optional: where it cannot be compiled (no compiler, PyPy), devicegate installs
and runs as pure Python, admitting and refusing exactly the same requests, only more slowly.
A non-empty DEVICEGATE_REQUIRE_EXTENSIONS makes a failed build fail the install instead (the
test suite sets it: a silent fallback would leave the compiled path untested).
"""

import os
import platform

from setuptools import Extension, setup

required = bool(os.environ.get("DEVICEGATE_REQUIRE_EXTENSIONS"))
extensions = []
if platform.python_implementation() == "CPython":
    extensions.append(
        Extension("devicegate._speedups", ["src/devicegate/_speedups.c"], optional=not required)
    )
elif required:
    raise SystemExit("DEVICEGATE_REQUIRE_EXTENSIONS: the C fast path needs CPython")

setup(ext_modules=extensions)
