"""Build script: compiles the Cython hot path in ext/ into the eventcore package.

Metadata lives in pyproject.toml. This file only declares extension modules, so
that `pip install .` compiles them where a compiler is present. Until the
Cython modules land (see the hot-path issue), ext/ is empty and the build is
pure Python. EVENTCORE_PUREPYTHON=1 always builds without extensions.
"""
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def _extensions():
    if os.environ.get("EVENTCORE_PUREPYTHON") == "1":
        return []
    sources = sorted((HERE / "ext").glob("*.pyx"))
    if not sources:
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    modules = [
        Extension(f"eventcore.{src.stem}", [str(src.relative_to(HERE))]) for src in sources
    ]
    return cythonize(modules, language_level=3)


setup(ext_modules=_extensions())
