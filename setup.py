"""Build script: compiles the Cython hot path in ext/ into the eventcore package.

Metadata lives in pyproject.toml; this file only declares the extension modules: each
ext/*.pyx is one module, eventcore.<stem>; the ext/*.pxi files are the parts it includes
(one per module of src/eventcore/_pure, plus the C side of the modules both twins share).

* With Cython installed (the normal build, see [build-system] in pyproject.toml) the
  .pyx sources are compiled; the sdist also carries the generated C, so building
  from it works without Cython.
* EVENTCORE_PUREPYTHON=1 builds without extensions (pure-Python implementation only).
* If compiling fails (no C compiler), the build falls back to pure Python with a
  warning, unless EVENTCORE_REQUIRE_EXTENSIONS=1 (what CI sets), which makes it an error.
"""
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
REQUIRE = os.environ.get("EVENTCORE_REQUIRE_EXTENSIONS") == "1"


def _extensions():
    if os.environ.get("EVENTCORE_PUREPYTHON") == "1":
        return []
    pyx = sorted((HERE / "ext").glob("*.pyx"))
    try:
        from Cython.Build import cythonize
    except ImportError:
        cythonize = None
    if cythonize is not None and pyx:
        modules = [Extension(f"eventcore.{p.stem}", [f"ext/{p.name}"]) for p in pyx]
        return cythonize(modules, language_level=3, compiler_directives={"embedsignature": True})
    generated = sorted((HERE / "ext").glob("*.c"))
    if not generated and pyx and REQUIRE:
        raise RuntimeError("Cython is needed to build the extensions from a git checkout: pip install Cython")
    return [Extension(f"eventcore.{c.stem}", [f"ext/{c.name}"]) for c in generated]


class OptionalBuildExt(build_ext):
    """Compile the extensions if possible; otherwise keep the pure-Python implementation."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            self._give_up(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._give_up(exc)

    def _give_up(self, exc):
        if REQUIRE:
            raise exc
        sys.stderr.write(
            f"WARNING: eventcore's compiled hot path could not be built ({exc}); "
            "installing the pure-Python implementation only.\n"
        )


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
