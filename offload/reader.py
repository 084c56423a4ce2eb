"""Positioned reads of one file that count what they read, bypassing the page cache where possible."""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path

from offload.errors import FormatError

DIRECT_ALIGN = 4096


class CountingReader:
    """Reads byte ranges with os.preadv (O_DIRECT when the file system allows, else buffered), counting bytes.

    O_DIRECT needs aligned offsets, lengths and buffers: aligned ranges are read into a page-aligned
    anonymous mmap; anything else, or a file system that refuses O_DIRECT, falls back to a buffered fd.
    `trace`, if given, receives (offset, length) for every read.
    """

    def __init__(self, path: str | os.PathLike, direct: bool = True, trace: list | None = None) -> None:
        self.path = Path(path)
        self.bytes_read = 0
        self.reads = 0
        self.trace = trace
        self._local = threading.local()
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._direct_fd: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self._direct_fd = None  # tmpfs and some others refuse O_DIRECT

    @property
    def direct(self) -> bool:
        """Whether aligned reads bypass the page cache."""
        return self._direct_fd is not None

    def size(self) -> int:
        """The file's current size."""
        return os.fstat(self._fd).st_size

    def read(self, offset: int, length: int, scratch: bool = False) -> mmap.mmap | bytearray | memoryview:
        """Exactly `length` bytes at `offset` (a writable buffer); FormatError if the file ends first.

        scratch: into this thread's reusable buffer (a view of it, valid until the thread's next scratch
        read): a stream of reads then reuses memory instead of faulting in fresh pages for each.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        aligned = offset % DIRECT_ALIGN == 0 and length % DIRECT_ALIGN == 0 and length > 0
        buf: mmap.mmap | bytearray | memoryview
        if scratch:
            buf = self._scratch(length)
        if aligned and self._direct_fd is not None:
            if not scratch:
                buf = mmap.mmap(-1, length)
            try:
                got = self._fill(self._direct_fd, buf, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(self._direct_fd)  # the file system accepted the flag but not the read
                self._direct_fd = None
                got = self._fill(self._fd, buf, offset)
        else:
            if not scratch:
                buf = bytearray(length)
            got = self._fill(self._fd, buf, offset)
        self.bytes_read += got
        self.reads += 1
        if self.trace is not None:
            self.trace.append((offset, length))
        if got != length:
            raise FormatError(f"short read at offset {offset}: got {got} of {length} bytes (file truncated?)",
                              self.path)
        return buf

    def _scratch(self, length: int) -> memoryview:
        """This thread's scratch buffer (page-aligned, for O_DIRECT), at least `length` bytes."""
        view = getattr(self._local, "view", None)
        if view is None or len(view) < length:  # the old one goes when the last view of it does
            view = self._local.view = memoryview(mmap.mmap(-1, max(length, DIRECT_ALIGN)))
        return view[:length]

    @staticmethod
    def _fill(fd: int, buf, offset: int) -> int:
        view = memoryview(buf)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def close(self) -> None:
        """Close the file descriptors."""
        for fd in (self._fd, self._direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._direct_fd = None
        self._fd = -1

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __enter__(self) -> "CountingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
