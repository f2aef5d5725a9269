"""Compiling `onednn_conv.cc` into a shared library, once per source and toolchain, into a cache folder.

The library's name holds a hash of everything it was built from: the source, the jaxlib whose FFI headers it
includes, the oneDNN it links, the compiler's version and the flags. Processes that race each build into a
temporary file beside the target and `os.replace` it there, so a reader sees a whole library or none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import shlex
import subprocess
import sys
import tempfile

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_conv.cc")
CACHE_ENV = "DEBKD_NATIVE_CACHE"
ONEDNN_DISTRIBUTIONS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")
CXXFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
INSTALL_HINT = 'pip install -e ".[native]"'


class BuildError(RuntimeError):
    """The library cannot be built here; the message says why (one line)."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
    cxx: list[str]
    cxx_version: str
    ffi_include: str
    onednn_include: str
    onednn_lib: str
    versions: dict


def cache_dir() -> str:
    """`$DEBKD_NATIVE_CACHE`, else `$XDG_CACHE_HOME/debkd_jax/native` (default ~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "debkd_jax", "native")


def find_onednn() -> tuple[str, str, str]:
    """(include folder, library folder, version) of the pip oneDNN (`onednn-cpu-gomp` with its headers)."""
    try:
        runtime = importlib.metadata.distribution(ONEDNN_DISTRIBUTIONS[0])
        devel = importlib.metadata.distribution(ONEDNN_DISTRIBUTIONS[1])
    except importlib.metadata.PackageNotFoundError as e:
        raise BuildError(f"oneDNN is not installed ({e.name}); {INSTALL_HINT}") from e
    header = next((f for f in devel.files or () if str(f).endswith("oneapi/dnnl/dnnl.hpp")), None)
    library = next((f for f in runtime.files or () if str(f).endswith("libdnnl.so.3")), None)
    if header is None or library is None:
        raise BuildError(f"the oneDNN wheels list no dnnl.hpp or libdnnl.so.3; reinstall: {INSTALL_HINT}")
    include = os.path.normpath(os.path.join(str(devel.locate_file(header)), "..", "..", ".."))
    lib = os.path.dirname(os.path.normpath(str(runtime.locate_file(library))))
    if not os.path.isfile(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp")):
        raise BuildError(f"oneDNN's headers are missing under {include}; reinstall: {INSTALL_HINT}")
    return include, lib, runtime.version


def toolchain() -> Toolchain:
    """The compiler (`$CXX`, default g++), the FFI headers of this jaxlib and the pip oneDNN."""
    import jax
    import jaxlib

    if not sys.platform.startswith("linux"):
        raise BuildError(f"the native conv is built on Linux only, not {sys.platform}")
    include, lib, onednn_version = find_onednn()
    cxx = shlex.split(os.environ.get("CXX", "g++")) or ["g++"]
    try:
        probe = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"no C++ compiler ({' '.join(cxx)}: {e}); install g++ or set CXX") from e
    if probe.returncode != 0:
        raise BuildError(f"the C++ compiler {' '.join(cxx)!r} does not run (exit {probe.returncode})")
    versions = {"jaxlib": jaxlib.__version__, "onednn": onednn_version}
    return Toolchain(
        cxx,
        probe.stdout.splitlines()[0] if probe.stdout else "",
        jax.ffi.include_dir(),
        include,
        lib,
        versions,
    )


def library_path(tc: Toolchain) -> str:
    """Where the library built by `tc` from `SOURCE` lives in the cache (a name keyed by all its inputs)."""
    h = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        h.update(f.read())
    for part in (tc.cxx_version, *CXXFLAGS, *sorted(tc.versions.items()), tc.onednn_lib, tc.ffi_include):
        h.update(repr(part).encode())
    return os.path.join(cache_dir(), f"onednn_conv-{h.hexdigest()[:20]}.so")


def build(tc: Toolchain | None = None) -> str:
    """The path of the library for this source and toolchain, compiled first if the cache lacks it.
    BuildError (one line, with the fix) when it cannot be built."""
    tc = tc or toolchain()
    path = library_path(tc)
    if os.path.isfile(path):
        return path
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write the native cache {folder} ({e}); set {CACHE_ENV}") from e
    cmd = [
        *tc.cxx,
        *CXXFLAGS,
        f"-I{tc.ffi_include}",
        f"-I{tc.onednn_include}",
        SOURCE,
        f"-L{tc.onednn_lib}",
        "-l:libdnnl.so.3",
        f"-Wl,-rpath,{tc.onednn_lib}",
        "-o",
        tmp,
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            log = path + ".log"
            with open(log, "w", encoding="utf-8") as f:
                f.write(" ".join(cmd) + "\n\n" + done.stdout + done.stderr)
            raise BuildError(
                f"compiling {os.path.basename(SOURCE)} failed (exit {done.returncode}; see {log})"
            )
        os.replace(tmp, path)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"compiling {os.path.basename(SOURCE)} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
