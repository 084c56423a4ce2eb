"""Flash read probe: read time against size with the page cache bypassed, and proof that it was.

Reads use O_DIRECT where the file system allows it, else plain reads after
posix_fadvise(POSIX_FADV_DONTNEED) on the range; either way the range is also dropped before
each read (widened to whole 2 MiB folios), and mincore(2) checks (on Linux) that none of it
was resident when the read began, so every sample says whether it was really a cold read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from profiler.costmodel import Sample

ALIGN = 4096
CHUNK = 8 << 20
# The page cache holds large folios (up to 2 MiB) that fadvise drops only when wholly inside the
# range, so the dropped range is widened to this alignment.
DROP_ALIGN = 2 << 20


@dataclass(frozen=True, slots=True)
class FlashRead:
    """One timed read."""

    size: int
    offset: int
    seconds: float
    method: str  # "direct" or "fadvise"
    cold: bool | None  # None: residency could not be checked here


def _libc():
    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name, use_errno=True) if name else None
    if lib is not None:
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


def resident_fraction(path: str | os.PathLike, offset: int = 0, length: int | None = None) -> float | None:
    """Share of a file range's pages in the page cache (mincore); None where it cannot be checked."""
    lib = _libc()
    if lib is None or not hasattr(lib, "mincore"):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        length = size - offset if length is None else length
        page = mmap.PAGESIZE
        start = offset - offset % page
        span = offset + length - start
        if span <= 0:
            return 0.0
        addr = lib.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            n = (span + page - 1) // page
            vec = (ctypes.c_ubyte * n)()
            if lib.mincore(addr, span, vec) != 0:
                return None
            return sum(v & 1 for v in vec) / n
        finally:
            lib.munmap(addr, span)
    finally:
        os.close(fd)


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to drop a range of a file from the page cache (its pages must be clean)."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def write_probe_file(path: str | os.PathLike, nbytes: int) -> Path:
    """A file of nbytes random bytes, synced to the disk (reused if it is already that size)."""
    p = Path(path)
    nbytes -= nbytes % ALIGN
    if p.exists() and p.stat().st_size == nbytes:
        return p
    tmp = p.with_name(p.name + ".tmp")
    block = os.urandom(min(CHUNK, nbytes))
    with open(tmp, "wb") as f:
        left = nbytes
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            block = block[1:] + block[:1] if left else block  # keep blocks distinct
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p


class FlashProbe:
    """Times cold reads of a probe file: O_DIRECT if allowed, else fadvise-dropped reads."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.method = "direct" if self._direct_works() else "fadvise"
        self._buf: mmap.mmap | None = None

    def _buffer(self, size: int) -> memoryview:
        """A page-aligned buffer of at least `size` bytes, already faulted in."""
        if self._buf is None or len(self._buf) < size:
            self._buf = mmap.mmap(-1, size)
            self._buf[:] = bytes(size)
        return memoryview(self._buf)[:size]

    def _direct_works(self) -> bool:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY | flag)
        except OSError:
            return False
        try:
            buf = mmap.mmap(-1, ALIGN)
            return os.preadv(fd, [buf], 0) == ALIGN
        except OSError:
            return False
        finally:
            os.close(fd)

    def read(self, size: int, offset: int) -> FlashRead:
        """One timed read of `size` bytes at `offset` (both multiples of 4 KiB) from a cold cache."""
        if size % ALIGN or offset % ALIGN or offset + size > self.size:
            raise ValueError(f"read of {size} at {offset} is not 4 KiB aligned or runs past {self.size}")
        flags = os.O_RDONLY | (os.O_DIRECT if self.method == "direct" else 0)
        fd = os.open(self.path, flags)
        try:
            lo = offset - offset % DROP_ALIGN
            drop_cached(fd, lo, -(-(offset + size) // DROP_ALIGN) * DROP_ALIGN - lo)
            cold = resident_fraction(self.path, offset, size)
            if cold:  # something still cached: drop the whole file
                drop_cached(fd)
                cold = resident_fraction(self.path, offset, size)
            view = self._buffer(size)
            t0 = time.perf_counter()
            got = 0
            while got < size:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    raise OSError(f"short read of {self.path} at {offset + got}")
                got += n
            dt = time.perf_counter() - t0
            view.release()
        finally:
            os.close(fd)
        return FlashRead(size, offset, dt, self.method, None if cold is None else cold == 0.0)

    def run(self, sizes: list[int], repeats: int, seed: int = 0) -> list[FlashRead]:
        """`repeats` cold reads of each size at random aligned offsets."""
        rng = random.Random(seed)
        out = []
        for _ in range(repeats):
            for size in sizes:
                slots = (self.size - size) // ALIGN
                out.append(self.read(size, rng.randint(0, max(slots, 0)) * ALIGN))
        return out


def cached_read_seconds(path: str | os.PathLike, size: int, offset: int = 0) -> float:
    """Seconds of a read of a range that was just read (so served from the page cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = mmap.mmap(-1, size)
        os.preadv(fd, [buf], offset)  # warm the page cache and the buffer
        t0 = time.perf_counter()
        os.preadv(fd, [buf], offset)
        dt = time.perf_counter() - t0
        buf.close()
        return dt
    finally:
        os.close(fd)


def probe_flash(folder: str | os.PathLike, sizes: list[int], repeats: int,
                file_bytes: int) -> tuple[list[Sample], dict]:
    """Flash read samples (op flash:read) from a probe file in `folder`, and facts about how they were taken."""
    path = write_probe_file(Path(folder) / "flash-probe.bin", max(file_bytes, 2 * max(sizes)))
    probe = FlashProbe(path)
    reads = probe.run(sizes, repeats)
    cold = [r.cold for r in reads]
    info = {"file": str(path), "file_bytes": probe.size, "method": probe.method,
            "cold_verified": None if any(c is None for c in cold) else all(cold),
            "warm_reads": sum(1 for c in cold if c is False)}
    return [Sample("flash:read", r.size, r.seconds) for r in reads], info
