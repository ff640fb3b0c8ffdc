"""C sources of CPU kernels, compiled on first use with the machine's C compiler and cached.

`load(name)` compiles `name.c` of this folder (`-O3 -march=native -fopenmp`) into the cache folder
(`$CUSTOMLLM_CACHE_DIR/native`, as model/layers/kernel_choice.py's timings), under a name that
hashes the sources (every C file here: one may include others), the flags, the compiler's version
and the CPU, and loads it with ctypes. OpenMP
comes from the libgomp PyTorch already loaded (same soname), so the kernels share its threads and
its thread count. Without a compiler, or when compilation or loading fails, `load` returns None
(with one warning) and callers keep their PyTorch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("customllm.native")

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
_loaded: dict[str, ctypes.CDLL | None] = {}
_functions: dict[tuple[str, str], object] = {}


def compiler() -> str | None:
    """$CC when set (empty: none), else cc or gcc from PATH."""
    if "CC" in os.environ:
        return shutil.which(os.environ["CC"]) if os.environ["CC"] else None
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.machine()


def sources_digest() -> str:
    """A short hash of every C source here: what timings of these kernels are valid for."""
    folder = Path(__file__).parent
    source = b"\0".join(path.read_bytes() for path in sorted(folder.glob("*.[ch]")))
    return hashlib.blake2b(source, digest_size=6).hexdigest()


def library_path(name: str, cc: str) -> Path:
    from model.layers.kernel_choice import cache_dir
    folder = Path(__file__).parent
    source = b"\0".join([(folder / f"{name}.c").read_bytes()] +
                        [path.read_bytes() for path in sorted(folder.glob("*.[ch]")) if path.name != f"{name}.c"])
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.blake2b(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()]),
                          digest_size=10).hexdigest()
    return cache_dir() / "native" / f"{name}-{key}.so"


def _compile(name: str, cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(Path(__file__).parent / f"{name}.c"), "-o", tmp, "-lm"],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)            # atomic: a concurrent process sees all of it or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled CPU kernel %s in %.1f s (%s)", name, time.monotonic() - started, target)


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of `name.c`, or None when it cannot be built or loaded here."""
    if name in _loaded:
        return _loaded[name]
    library = None
    cc = compiler()
    if cc is None:
        log.warning("no C compiler (cc, gcc or $CC): CPU kernel %s off, PyTorch ops instead", name)
    else:
        try:
            target = library_path(name, cc)
            if not target.exists():
                _compile(name, cc, target)
            library = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            log.warning("CPU kernel %s could not be built (%s): PyTorch ops instead", name, str(detail).strip()[:500])
    _loaded[name] = library
    return library


def function(name: str, symbol: str, restype, argtypes: list):
    """`symbol` of the compiled `name.c` with its C signature set (ctypes types), or None when the
    library cannot be built here; looked up once."""
    key = (name, symbol)
    if key not in _functions or _loaded.get(name) is None:
        library = load(name)
        fn = None
        if library is not None:
            fn = getattr(library, symbol)
            fn.restype, fn.argtypes = restype, argtypes
        _functions[key] = fn
    return _functions[key]
