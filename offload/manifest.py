"""manifest.json of a moed model directory: what every file holds, where, and its checksums."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload.errors import FormatError

try:  # zlib-ng's crc32 (the same function, vectorised): 0.13 ms for a 6 MiB expert instead of 1.6 with zlib
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; an install without its wheel still works
    _crc32 = zlib.crc32

FORMAT = "moed-store"
FORMAT_VERSION = 1
CHECKSUM = "crc32"
MANIFEST = "manifest.json"
DENSE = "dense.safetensors"
EXPERTS = "experts.bin"
TOKENIZER = "tokenizer.json"
MAX_MANIFEST_BYTES = 256 << 20


def running_checksum(buf, running: int = 0) -> int:
    """The store's checksum (crc32) of what came before a buffer (`running`) and the buffer, as a number."""
    return _crc32(buf, running)


def checksum(buf, running: int = 0) -> str:
    """The store's checksum of a buffer as the manifest writes it (8 hex digits); `running`: that of what came
    before it (running_checksum)."""
    return f"{running_checksum(buf, running) & 0xFFFFFFFF:08x}"


@dataclass(frozen=True, slots=True)
class Extent:
    """A named byte range of a file and its checksum."""

    name: str
    offset: int
    length: int
    checksum: str


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file of the store: its size and extents."""

    name: str
    size: int
    extents: tuple[Extent, ...]


@dataclass(frozen=True, slots=True)
class ExpertExtent:
    """One expert's extent in the experts file, with a checksum per section (head, plane 0..7)."""

    layer: int
    expert: int
    offset: int
    length: int
    checksums: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything manifest.json says."""

    architecture: str
    config: dict
    source: dict
    tokenizer: dict  # bos_id, eos_ids, add_bos, chat_template, special
    scheme: str
    group_size: int
    alignment: int
    matrices: tuple[tuple[str, tuple[int, int]], ...]  # (name, (N, K)) for gate, up, down
    section_lengths: tuple[int, ...]  # padded lengths of head, plane 0..7
    files: dict[str, FileEntry] = field(default_factory=dict)  # dense, tokenizer
    experts_size: int = 0
    experts: tuple[ExpertExtent, ...] = ()
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """The manifest as JSON text."""
        return json.dumps({
            "format": FORMAT, "format_version": self.format_version, "architecture": self.architecture,
            "config": self.config, "source": self.source, "tokenizer": self.tokenizer,
            "quant": {"scheme": self.scheme, "group_size": self.group_size, "param_dtype": "float16",
                      "planes": 8, "plane_order": "msb-first"},
            "checksum": CHECKSUM,
            "files": {
                **{f.name: {"size": f.size, "extents": [
                    {"name": e.name, "offset": e.offset, "length": e.length, "checksum": e.checksum}
                    for e in f.extents]} for f in self.files.values()},
                EXPERTS: {
                    "size": self.experts_size, "alignment": self.alignment,
                    "matrices": [{"name": n, "shape": list(s)} for n, s in self.matrices],
                    "sections": list(self.section_lengths),
                    "extents": [{"layer": x.layer, "expert": x.expert, "offset": x.offset, "length": x.length,
                                 "checksums": list(x.checksums)} for x in self.experts],
                },
            },
        }, indent=1)

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        """Parse and type-check manifest.json; FormatError naming the file and field otherwise."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise FormatError("no manifest.json: not a complete moed model directory", path.parent) from None
        if size > MAX_MANIFEST_BYTES:
            raise FormatError(f"manifest is {size} bytes (limit {MAX_MANIFEST_BYTES})", path)
        try:
            d = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"not valid JSON: {e}", path) from None
        g = _Getter(path)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise FormatError(f"not a moed store manifest (format is not {FORMAT!r})", path)
        version = g(d, "format_version", int)
        if version != FORMAT_VERSION:
            raise FormatError(f"unknown format version {version} (this moed reads version {FORMAT_VERSION})", path)
        if g(d, "checksum", str) != CHECKSUM:
            raise FormatError(f"unknown checksum algorithm {d['checksum']!r} (expected {CHECKSUM})", path)
        q = g(d, "quant", dict)
        files = g(d, "files", dict)
        ex = g(files, EXPERTS, dict)
        entries = {}
        for name in (DENSE, TOKENIZER):
            f = g(files, name, dict)
            entries[name] = FileEntry(name, g(f, "size", int), tuple(
                Extent(g(e, "name", str), g(e, "offset", int), g(e, "length", int), g(e, "checksum", str))
                for e in g(f, "extents", list)))
        matrices = tuple((g(m, "name", str), tuple(g(m, "shape", list))) for m in g(ex, "matrices", list))
        experts = tuple(ExpertExtent(g(x, "layer", int), g(x, "expert", int), g(x, "offset", int),
                                     g(x, "length", int), tuple(g(x, "checksums", list)))
                        for x in g(ex, "extents", list))
        return cls(g(d, "architecture", str), g(d, "config", dict), g(d, "source", dict), g(d, "tokenizer", dict),
                   g(q, "scheme", str), g(q, "group_size", int), g(ex, "alignment", int), matrices,
                   tuple(g(ex, "sections", list)), entries, g(ex, "size", int), experts, version)


class _Getter:
    """Typed field access that names the manifest in its errors."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, d: Any, key: str, typ: type) -> Any:
        if not isinstance(d, dict) or key not in d:
            raise FormatError(f"manifest lacks field {key!r}", self.path)
        v = d[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise FormatError(f"manifest field {key!r} should be {typ.__name__}, got {type(v).__name__}", self.path)
        return v
