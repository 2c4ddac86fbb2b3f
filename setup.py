"""Build script: compiles the Cython hot path in ext/ into the eventcore package.

Metadata lives in pyproject.toml; this file only declares the extension modules: each
ext/*.pyx is one module, eventcore.<stem>; the ext/*.pxi files are the parts it includes
(one per module of src/eventcore/_pure, plus the C side of the modules both twins share).

* With Cython installed (the normal build, see [build-system] in pyproject.toml) the
  .pyx sources are compiled; the sdist also carries the generated C, so building
  from it works without Cython.
* A build that cannot compile the extension (no C compiler, no Python headers, no Cython
  in a git checkout) fails, naming the cause: a package that silently lacks its hot path
  is slower than its user thinks.
* EVENTCORE_PUREPYTHON=1 asks for the pure-Python implementation on purpose: no extension
  is built. `import eventcore` then warns (eventcore.PurePythonWarning) unless
  EVENTCORE_IMPL=python says the pure-Python implementation is meant.
* EVENTCORE_REQUIRE_EXTENSIONS=1 (what CI sets) is still honoured; it is what every build
  now does unless EVENTCORE_PUREPYTHON=1, and asking for both is an error.
* Release builds carry no debug symbols (`build_ext --debug` or EVENTCORE_DEBUG=1 keeps them).
"""
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
PURE = os.environ.get("EVENTCORE_PUREPYTHON") == "1"
REQUIRE = os.environ.get("EVENTCORE_REQUIRE_EXTENSIONS") == "1"
HOW_TO_SKIP = "set EVENTCORE_PUREPYTHON=1 to install the (slower) pure-Python implementation on purpose"

if PURE and REQUIRE:
    raise SystemExit("EVENTCORE_PUREPYTHON=1 and EVENTCORE_REQUIRE_EXTENSIONS=1 contradict each other: unset one")


def _extensions():
    if PURE:
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
    if not generated:
        raise SystemExit(
            "eventcore: Cython is needed to build the compiled hot path from a git checkout "
            f"(pip install Cython, or build from the sdist, which carries the generated C); or {HOW_TO_SKIP}."
        )
    return [Extension(f"eventcore.{c.stem}", [f"ext/{c.name}"]) for c in generated]


def _strip_flags(compiler_type: str, platform: str) -> tuple[list[str], list[str]]:
    """Compile and link flags that leave debug symbols out of the module.

    Python's own CFLAGS carry -g, which the later -g0 overrides. Measured on Linux x86_64,
    CPython 3.11, gcc: _speedups went from 1,957,288 bytes (with debug_info) to 299,968
    (-g0 and -s; PyInit__speedups stays exported). GNU ld and lld take -s; Apple's ld calls
    it obsolete, and -g0 alone already keeps the DWARF out there. Other compilers (MSVC,
    mingw) get nothing: MSVC writes no debug info unless asked.
    """
    if compiler_type != "unix":
        return [], []
    if platform.startswith("linux"):
        return ["-g0"], ["-s"]
    if platform == "darwin":
        return ["-g0"], []
    return [], []


class RequiredBuildExt(build_ext):
    """Compile the extensions, without debug symbols unless --debug; a failure fails the build."""

    def build_extensions(self):
        # EVENTCORE_DEBUG=1 keeps the symbols too (pip cannot pass --debug through to build_ext).
        if not self.debug and os.environ.get("EVENTCORE_DEBUG") != "1":
            compile_args, link_args = _strip_flags(self.compiler.compiler_type, sys.platform)
            for ext in self.extensions:
                ext.extra_compile_args = [*ext.extra_compile_args, *compile_args]
                ext.extra_link_args = [*ext.extra_link_args, *link_args]
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: say what to do, then fail
            sys.stderr.write(
                f"ERROR: eventcore's compiled hot path ({ext.name}) could not be built: {exc}\n"
                f"Install a C compiler and the Python headers, or {HOW_TO_SKIP}.\n"
            )
            raise


setup(ext_modules=_extensions(), cmdclass={"build_ext": RequiredBuildExt})
