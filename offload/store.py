"""An opened moed model directory: manifest checked against the files, dense weights verified,
experts read by prefix (one aligned read per request) and verified section by section."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from offload.errors import FormatError
from offload.layout import ALIGN, MATRICES, ExpertLayout, section_name
from offload.manifest import (DENSE, EXPERTS, MANIFEST, TOKENIZER, ExpertExtent, Extent, FileEntry, Manifest, checksum,
                              running_checksum)
from offload.reader import CountingReader
from quant.groups import GROUP_SIZES
from quant.planes import PLANES
from quant.kernels.base import MsbMatrix
from quant.schemes import MSB, Scheme, scheme
from quant.views import ExpertViews

if TYPE_CHECKING:
    from quant.kernels import Backend, PreparedExpert

ROWS_CHUNK = 8 << 20  # bytes a matrix read for its rows is verified in at a time
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Store:
    """A moed model directory opened for reading; every inconsistency is a FormatError naming file and extent."""

    def __init__(self, path: str | Path, direct: bool = True, trace: list | None = None,
                 verify_once: bool = True) -> None:
        self.path = Path(path)
        # an expert section's checksum is checked when it is first read (a damaged byte fails its first
        # use); later reads of it, streaming the same expert again, skip the check (~0.4 ms per MiB)
        self.verify_once = verify_once
        self._verified: set[tuple[int, int, int]] = set()
        self.manifest = Manifest.read(self.path / MANIFEST)
        m = self.manifest
        where = self.path / MANIFEST
        try:
            self.scheme: Scheme = scheme(m.scheme)
        except ValueError as e:
            raise FormatError(str(e), where) from None
        if m.group_size not in GROUP_SIZES:
            raise FormatError(f"group size {m.group_size} is not one of {GROUP_SIZES}", where)
        if m.alignment != ALIGN or [n for n, _ in m.matrices] != list(MATRICES) or any(
                len(s) != 2 or not all(isinstance(d, int) and d > 0 for d in s) for _, s in m.matrices):
            raise FormatError("experts layout (alignment, matrices) is not one this moed writes", where)
        try:
            self.layout = ExpertLayout.build(self.scheme, tuple(s for _, s in m.matrices), m.group_size)
        except ValueError as e:
            raise FormatError(f"experts layout: {e}", where) from None
        want = tuple(self.layout.section_length(s) for s in range(self.layout.sections))
        if m.section_lengths != want:
            raise FormatError(f"manifest section lengths {list(m.section_lengths)} disagree with the "
                              f"{m.scheme} scheme's {list(want)}", where)
        self._index = self._check_extents()
        self._per_layer = Counter(layer for layer, _ in self._index)
        for f in m.files.values():
            self._check_file(f)
        self._check_size(self.path / EXPERTS, m.experts_size)
        self.reader = CountingReader(self.path / EXPERTS, direct=direct, trace=trace)

    # -- checks --

    def _check_size(self, f: Path, size: int) -> None:
        try:
            actual = f.stat().st_size
        except FileNotFoundError:
            raise FormatError("file is missing", f) from None
        if actual != size:
            raise FormatError(f"file is {actual} bytes but the manifest says {size} (truncated or altered)", f)

    def _check_file(self, f: FileEntry) -> None:
        self._check_size(self.path / f.name, f.size)
        end = 0
        for e in sorted(f.extents, key=lambda e: e.offset):
            if e.offset != end or e.length < 0 or e.offset + e.length > f.size:
                raise FormatError(f"extent {e.name} (offset {e.offset}, length {e.length}) does not continue the "
                                  f"extents before it within the file's {f.size} bytes", self.path / f.name)
            end = e.offset + e.length
        if end != f.size:
            raise FormatError(f"extents cover {end} of the file's {f.size} bytes", self.path / f.name)

    def _check_extents(self) -> dict[tuple[int, int], ExpertExtent]:
        m, where = self.manifest, self.path / EXPERTS
        index: dict[tuple[int, int], ExpertExtent] = {}
        end = 0
        for x in sorted(m.experts, key=lambda x: x.offset):
            name = f"layer {x.layer} expert {x.expert}"
            if (x.layer, x.expert) in index:
                raise FormatError(f"extent {name} is listed twice in the manifest", where)
            if x.length != self.layout.length or x.offset % ALIGN or x.offset < end:
                raise FormatError(f"extent {name} (offset {x.offset}, length {x.length}) is misplaced: "
                                  f"expected an aligned, non-overlapping extent of {self.layout.length} bytes", where)
            if len(x.checksums) != self.layout.sections or not all(isinstance(c, str) for c in x.checksums):
                raise FormatError(f"extent {name} has {len(x.checksums)} checksums, expected {self.layout.sections}",
                                  where)
            end = x.offset + x.length
            index[(x.layer, x.expert)] = x
        if end > m.experts_size:
            raise FormatError(f"extents end at byte {end} but the manifest gives the file {m.experts_size} bytes",
                              where)
        return index

    # -- what the model builder asks for --

    @property
    def layers(self) -> list[int]:
        """MoE layer indices with experts in the store."""
        return sorted({layer for layer, _ in self._index})

    def n_experts(self, layer: int) -> int:
        """Experts stored for a layer."""
        return self._per_layer.get(layer, 0)

    def has(self, layer: int, expert: int) -> bool:
        """Whether the store holds this expert."""
        return (layer, expert) in self._index

    def tokenizer_json(self) -> str:
        """The tokenizer file's text, after its checksum."""
        f = self.manifest.files[TOKENIZER]
        buf = self._verified_file(f)
        try:
            return bytes(buf).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"tokenizer is not UTF-8: {e}", self.path / TOKENIZER) from None

    def dense_tensors(self) -> dict[str, torch.Tensor]:
        """Every dense tensor, each read and checked on its own."""
        d = self.dense()
        out = {name: d.tensor(name) for name in d.names}
        d.check_unread()
        return out

    def dense(self) -> "DenseReader":
        """The dense weights file, header read and checked against the manifest; tensors read on request."""
        return DenseReader(self.path / DENSE, self.manifest.files[DENSE])

    def _verified_file(self, f: FileEntry) -> bytearray:
        with CountingReader(self.path / f.name, direct=False) as r:
            buf = r.read(0, f.size)
        for e in f.extents:
            self._verify(buf, e.offset, e.length, e.checksum, f"extent {e.name}", self.path / f.name, e.offset)
        return buf

    # -- experts --

    def extent(self, layer: int, expert: int) -> ExpertExtent:
        """Where an expert lives; KeyError if the store lacks it."""
        return self._index[(layer, expert)]

    def read_sections(self, layer: int, expert: int, first: int, stop: int, scratch: bool = False) -> list:
        """Sections first..stop-1 of an expert (0 = head, 1 + i = plane i) in ONE read, each verified the
        first time it is read (with verify_once, the default; every time otherwise).

        scratch: the read goes into this thread's reusable buffer (CountingReader.read); the sections are
        valid until the thread's next scratch read, for a caller that makes its own form of them first.
        """
        x = self.extent(layer, expert)
        if not 0 <= first < stop <= self.layout.sections:
            raise ValueError(f"bad section range {first}..{stop}")
        start = self.layout.section_offset(first)
        length = self.layout.section_offset(stop) - start
        buf = self.reader.read(x.offset + start, length, scratch)
        out, at = [], 0
        for s in range(first, stop):
            n = self.layout.section_length(s)
            piece = memoryview(buf)[at:at + n]
            if (layer, expert, s) not in self._verified:
                self._verify(piece, 0, n, x.checksums[s], f"extent layer {layer} expert {expert} {section_name(s)}",
                             self.path / EXPERTS, x.offset + start + at)
                if self.verify_once:
                    self._verified.add((layer, expert, s))
            out.append(piece)
            at += n
        return out

    def read_expert(self, layer: int, expert: int, bits: int, scratch: bool = False) -> list:
        """The r-bit prefix of an expert (head and planes 0..bits-1) as verified sections."""
        if not 1 <= bits <= PLANES:
            raise ValueError(f"bits must be in 1..{PLANES}, got {bits}")
        return self.read_sections(layer, expert, 0, bits + 1, scratch)

    def views(self, sections: list, bits: int, packed: bool = False) -> ExpertViews:
        """The `bits`-bit views of gate, up and down from an expert's first bits + 1 sections (`packed`: codes
        left as planes where the scheme can, for a backend that reads planes; see Scheme.view)."""
        if len(sections) < bits + 1:
            raise ValueError(f"a {bits}-bit view needs {bits + 1} sections, got {len(sections)}")
        parts = [self.layout.split(s, sections[s]) for s in range(bits + 1)]
        views = []
        for m, shape in enumerate(self.layout.shapes):
            enc = self.scheme.decode(shape, self.manifest.group_size, parts[0][m], [p[m] for p in parts[1:]])
            views.append(self.scheme.view(enc, bits, packed))
        return ExpertViews(*views)

    def form(self, backend: "Backend", sections: list, bits: int, act: str) -> "PreparedExpert":
        """`backend`'s compute form (PreparedExpert) of an expert at `bits` from its first bits + 1 sections: made
        from the bit-planes as read where the backend reads planes, else from the unpacked codes; an MSB expert's
        straight from its bytes where the backend can (prepare_msb: the same form without the views)."""
        if isinstance(self.scheme, MSB) and hasattr(backend, "prepare_msb"):
            return backend.prepare_msb(self.msb_matrices(sections, bits), bits, act)
        return backend.prepare_expert(self.views(sections, bits, backend.reads_planes), act)

    def msb_matrices(self, sections: list, bits: int) -> list[MsbMatrix]:
        """An MSB expert's matrices by address in its first bits + 1 sections (valid while they are)."""
        if not isinstance(self.scheme, MSB):
            raise ValueError(f"the store's scheme is {self.scheme.name}, not msb")
        if len(sections) < bits + 1:
            raise ValueError(f"a {bits}-bit form needs {bits + 1} sections, got {len(sections)}")
        base = [np.frombuffer(sections[s], np.uint8).ctypes.data for s in range(bits + 1)]
        parts, out = self.layout.parts, []
        for m, (n, k) in enumerate(self.layout.shapes):
            at = [base[s] + sum(parts[s][:m]) for s in range(bits + 1)]  # (MSB planes hold no params: bits only)
            out.append(MsbMatrix(n, k, self.manifest.group_size, at[0], tuple(at[1:])))
        return out

    @staticmethod
    def _verify(buf, offset: int, length: int, want: str, name: str, path: Path, file_offset: int) -> None:
        _compare(checksum(memoryview(buf)[offset:offset + length]), want, name, path, file_offset, length)

    def close(self) -> None:
        """Close the experts file."""
        self.reader.close()


class DenseReader:
    """The dense safetensors file of a store: every header entry checked against the manifest on open, each
    tensor read with its own positioned read and checked against its extent's checksum when asked for (so a
    model never holds the whole file at once); `check_unread` verifies whatever no one asked for."""

    def __init__(self, path: Path, f: FileEntry) -> None:
        self.path, self.file = path, f
        self._reader = CountingReader(path, direct=False)
        extents = {e.name: e for e in f.extents}
        head = extents.get("header")
        if head is None or head.offset != 0 or head.length < 8:
            raise FormatError("the manifest lists no safetensors header extent", path)
        buf = self._reader.read(0, head.length)
        Store._verify(buf, 0, head.length, head.checksum, "extent header", path, 0)
        (n,) = struct.unpack_from("<Q", buf, 0)
        if 8 + n != head.length:
            raise FormatError(f"safetensors header length {n} disagrees with the manifest's header extent", path)
        try:
            header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"safetensors header is not valid JSON: {e}", path) from None
        self._tensors: dict[str, tuple[Extent, torch.dtype, list[int]]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            e = extents.get(name)
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            if e is None or dtype is None:
                raise FormatError(f"tensor {name} is not in the manifest or has an unsupported dtype", path)
            try:
                begin, end = (int(v) for v in info["data_offsets"])
                shape = [int(d) for d in info["shape"]]
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"tensor {name}: malformed safetensors header entry", path) from None
            numel = 1
            for d in shape:
                numel *= d
            if (8 + n + begin, end - begin) != (e.offset, e.length) or numel * dtype.itemsize != e.length:
                raise FormatError(f"extent {name}: the safetensors header and the manifest disagree", path)
            self._tensors[name] = (e, dtype, shape)
        listed = {e.name for e in f.extents if e.name != "header" and not e.name.startswith("gap at ")}
        if set(self._tensors) != listed:
            raise FormatError(f"tensors {sorted(listed - set(self._tensors))} are in the manifest but not the file",
                              path)
        if self._reader.size() != f.size:
            raise FormatError(f"file is {self._reader.size()} bytes but the manifest says {f.size}", path)
        self._unread = {e.name for e in f.extents if e.name != "header"}

    @property
    def names(self) -> list[str]:
        """The tensors in the file."""
        return list(self._tensors)

    def tensor(self, name: str) -> torch.Tensor | None:
        """One tensor, read and verified now (None if the file has no such tensor)."""
        got = self._tensors.get(name)
        if got is None:
            return None
        e, dtype, shape = got
        buf = self._read(e)
        if not e.length:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def rows(self, name: str, verify_now: bool = True) -> "TensorRows | None":
        """A matrix whose rows are read from the file when looked up (an embedding table a model need not
        hold), None if absent. Its extent is verified now, a block at a time with nothing of it kept, or (not
        verify_now, for a caller that reads it once in blocks, in order) as those blocks are read."""
        got = self._tensors.get(name)
        if got is None:
            return None
        e, dtype, shape = got
        if len(shape) != 2 or not e.length:
            raise FormatError(f"tensor {name} has shape {shape}: rows need a non-empty matrix", self.path)
        rows = TensorRows(CountingReader(self.path, direct=False), e, dtype, (shape[0], shape[1]), self.path)
        if verify_now:
            rows.verify()
        self._unread.discard(name)  # (verified now, or as its blocks are read)
        return rows

    def check_unread(self) -> None:
        """Verify every extent no tensor() call has read (unused tensors, gaps between them)."""
        for e in self.file.extents:
            if e.name in self._unread:
                self._read(e)

    def _read(self, e: Extent):
        buf = self._reader.read(e.offset, e.length)
        Store._verify(buf, 0, e.length, e.checksum, f"extent {e.name}", self.path, e.offset)
        self._unread.discard(e.name)
        return buf

    def close(self) -> None:
        """Close the file."""
        self._reader.close()


class TensorRows:
    """Rows of a matrix in a file, each read with a positioned read when asked for. Until its checksum has
    been checked (verify(), or block() reading every row in order, the last block raising on a mismatch)
    rows are read in order only."""

    def __init__(self, reader: CountingReader, extent: Extent, dtype: torch.dtype, shape: tuple[int, int],
                 path: Path) -> None:
        self.reader, self.extent, self.dtype, self.shape, self.path = reader, extent, dtype, shape, path
        self.offset = extent.offset
        self.row_bytes = shape[1] * dtype.itemsize
        self._crc: int | None = 0  # crc32 of rows 0.._next-1 until the whole matrix is checked, then None
        self._next = 0

    def verify(self) -> None:
        """Read the whole matrix, a chunk of rows at a time, and check its checksum (FormatError)."""
        step = max(1, ROWS_CHUNK // self.row_bytes)
        for a in range(self._next, self.shape[0], step):
            self.block(a, min(self.shape[0], a + step))

    def block(self, a: int, b: int) -> torch.Tensor:
        """Rows a..b-1 with one read, [b - a, columns]."""
        if not 0 <= a < b <= self.shape[0]:
            raise IndexError(f"rows {a}..{b - 1} are not within 0..{self.shape[0] - 1}")
        if self._crc is not None and a != self._next:
            raise ValueError(f"rows of a matrix not yet verified are read in order (asked {a}, next {self._next})")
        buf = self.reader.read(self.offset + a * self.row_bytes, (b - a) * self.row_bytes)
        if self._crc is not None:
            self._crc, self._next = running_checksum(buf, self._crc), b
            if b == self.shape[0]:
                e = self.extent
                _compare(checksum(b"", self._crc), e.checksum, f"extent {e.name}", self.path, e.offset, e.length)
                self._crc = None
        return torch.frombuffer(buf, dtype=self.dtype).reshape(b - a, self.shape[1])

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ids (any shape of int64 within range) -> [*ids.shape, columns]."""
        if self._crc is not None:
            raise ValueError("rows are looked up once the matrix is verified (verify())")
        flat = ids.reshape(-1).tolist()
        if flat and not 0 <= min(flat) <= max(flat) < self.shape[0]:
            raise IndexError(f"row ids must be in 0..{self.shape[0] - 1}")
        out = torch.empty(len(flat), self.shape[1], dtype=self.dtype)
        view = out.view(torch.uint8).numpy().reshape(len(flat), self.row_bytes)
        for i, r in enumerate(flat):
            view[i] = np.frombuffer(self.reader.read(self.offset + r * self.row_bytes, self.row_bytes), np.uint8)
        return out.reshape(*ids.shape, self.shape[1])

    def close(self) -> None:
        self.reader.close()


def _compare(got: str, want: str, name: str, path: Path, offset: int, length: int) -> None:
    """FormatError naming the extent if a checksum is not the manifest's."""
    if got != want:
        raise FormatError(f"{name} (offset {offset}, length {length}): checksum mismatch "
                          f"(crc32 {got}, manifest {want})", path)


def dense_extents(path: Path) -> tuple[Extent, ...]:
    """Extents of a safetensors file as written (header, each tensor, any gap), tiling it, with checksums."""
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    spans = sorted((8 + n + info["data_offsets"][0], 8 + n + info["data_offsets"][1], name)
                   for name, info in header.items() if name != "__metadata__")
    out, end = [Extent("header", 0, 8 + n, checksum(data[:8 + n]))], 8 + n
    for b, e, name in spans + [(len(data), len(data), "")]:
        if b > end:
            out.append(Extent(f"gap at {end}", end, b - end, checksum(data[end:b])))
        if name:
            out.append(Extent(name, b, e - b, checksum(data[b:e])))
        end = max(end, e)
    return tuple(out)
