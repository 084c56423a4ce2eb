"""Native helpers for hot paths: quant/native.c (bit-plane unpacking, int8 kernels and the threads that
split them, one decode token's attention, RMS norm), compiled on first use.

The source is built with the system's C compiler (`$CC`, else cc) for this CPU into moed's cache
($CACHE_DIRECTORY/native under systemd, else $XDG_CACHE_HOME/moed/native, else ~/.cache/moed/native; one file
per source and CPU) and loaded with ctypes.
Where there is no compiler, the build fails, or MOED_NATIVE=0, `library()` is None: unpacking then uses
its numpy twin (the same codes, bit for bit; tests compare them) and the "native" kernel backend is
unavailable.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger("moed.native")

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c11")
_BUILD_LOCK = threading.Lock()


def enabled() -> bool:
    """False where MOED_NATIVE=0 (callers then use numpy)."""
    return os.environ.get("MOED_NATIVE", "1") != "0"


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get("CACHE_DIRECTORY"):  # systemd's CacheDirectory= (deploy/moed.service)
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moed" / "native"


def _cpu_key() -> str:
    """What -march=native depends on: the machine and its CPU's flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def build(out_dir: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
    """Compile native.c for this CPU (once per source, flags and CPU: an existing build is reused), with
    `extra` compiler flags; its path. Raises RuntimeError with the compiler's message when it cannot be built."""
    src = SOURCE.read_bytes()
    flags = (*FLAGS, *extra)
    key = hashlib.sha256(src + " ".join(flags).encode() + _cpu_key().encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"moed-native-{key}.so"
    if lib.exists():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) found")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm", "-lpthread"], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
        os.replace(tmp, lib)  # atomic: another process building the same file at once finds a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@cache
def library() -> ctypes.CDLL | None:
    """The loaded native library, or None (disabled, or it could not be built: logged once)."""
    if not enabled():
        return None
    with _BUILD_LOCK:
        try:
            lib = ctypes.CDLL(str(build()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("native helpers unavailable, using numpy: %s", e)
            return None
    return bind(lib)


class Expert(ctypes.Structure):
    """quant/native.c's moed_expert: an expert FFN's three matrices (codes, scale, offset, sums, group, bits),
    its width d, inner width f and activation."""

    _fields_ = [("w", ctypes.c_void_p * 3), ("s", ctypes.c_void_p * 3), ("z", ctypes.c_void_p * 3),
                ("e", ctypes.c_void_p * 3), ("G", ctypes.c_int * 3), ("bits", ctypes.c_int * 3),
                ("d", ctypes.c_int64), ("f", ctypes.c_int64), ("act", ctypes.c_int)]


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """lib with its functions' argument and result types declared (ctypes checks calls against them)."""
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    signatures = {
        "moed_unpack_planes": [ctypes.POINTER(P), I, L, P],
        "moed_interleave": [P, L, L, I, I, P, P],
        "moed_qgemm_mt": [P, I, P, P, P, P, L, L, I, I, L, L, P, L, I, I],
        "moed_ffn_many_mt": [P, I, I, P, P, I],
        "moed_decode_attention": [P, P, P, P, P, P, P, L, L, I, I, I, ctypes.c_float, P],
        "moed_rms_norm": [P, P, L, L, ctypes.c_float, P],
        "moed_park": [],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.moed_simd.argtypes, lib.moed_simd.restype = [], I
    lib.moed_interleave_planes.argtypes = [ctypes.POINTER(P), I, L, L, I, P, P, I]
    lib.moed_interleave_planes.restype = I
    lib.moed_interleave_params.argtypes, lib.moed_interleave_params.restype = [P, L, L, P], I
    lib.moed_form_msb.argtypes, lib.moed_form_msb.restype = [P, ctypes.POINTER(P), I, L, L, I, P, P, P, P, I], I
    return lib


SIMD_PATHS = ("plain C", "AVX2", "AVX512-VNNI")  # moed_simd()'s values, in order


def simd() -> str | None:
    """The path the library's dot products take on this CPU (SIMD_PATHS), or None where there is no library."""
    lib = library()
    return None if lib is None else SIMD_PATHS[lib.moed_simd()]


def unpack_planes(planes: list[np.ndarray], out: np.ndarray) -> bool:
    """Codes of len(planes) bits from planes (uint8, n bytes each, C-contiguous) into out (uint8, >= 8n
    bytes, C-contiguous), as quant.planes.unpack_planes; False (out untouched) without the native library."""
    lib = library()
    if lib is None:
        return False
    n = planes[0].size
    if out.size < 8 * n or not out.flags.c_contiguous or any(
            p.size != n or p.dtype != np.uint8 or not p.flags.c_contiguous for p in planes):
        raise ValueError("planes must be contiguous uint8 of one size and out hold 8 codes per plane byte")
    ptrs = (ctypes.c_void_p * len(planes))(*(p.ctypes.data for p in planes))
    lib.moed_unpack_planes(ptrs, len(planes), n, out.ctypes.data)
    return True
