"""Writing a moed model directory: under a temporary name, renamed into place only when complete."""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from offload.errors import MoedError
from offload.layout import MATRICES, ExpertLayout
from offload.manifest import (DENSE, EXPERTS, MANIFEST, TOKENIZER, ExpertExtent, Extent, FileEntry, Manifest,
                              checksum)
from offload.store import dense_extents
from quant.planes import PLANES
from quant.schemes import scheme


class StoreWriter:
    """Builds a store in `.NAME.partial-*` beside `out`; `commit()` renames it to `out`, anything else removes it.

    Use as a context manager: leaving the block by an exception aborts; a killed process leaves only the
    hidden partial directory, which has no manifest until the very end and is never at `out`.
    """

    def __init__(self, out: str | os.PathLike, manifest: Manifest, force: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not force:
            raise MoedError("output exists (use --force to replace it)", self.out)
        self.manifest = manifest
        self.scheme = scheme(manifest.scheme)
        self.layout = ExpertLayout.build(self.scheme, tuple(s for _, s in manifest.matrices), manifest.group_size)
        self.force = force
        self.tmp: Path | None = None
        self._experts = None
        self._extents: list[ExpertExtent] = []
        self._files: dict[str, FileEntry] = {}
        self._pos = 0
        self.bytes_written = 0

    def __enter__(self) -> "StoreWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        self._experts = open(self.tmp / EXPERTS, "wb")
        return self

    def __exit__(self, typ, exc, tb) -> None:
        if typ is not None:
            self.abort()

    def write_dense(self, tensors: dict[str, torch.Tensor]) -> None:
        """Dense weights into dense.safetensors (as given: the source's precision)."""
        path = self.tmp / DENSE
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors creates it owner-only; the rest of the store is world-readable
        _fsync(path)
        self._files[DENSE] = FileEntry(DENSE, path.stat().st_size, dense_extents(path))

    def write_tokenizer(self, text: str) -> None:
        """The tokenizer (tokenizers' JSON) into tokenizer.json."""
        data = text.encode("utf-8")
        (self.tmp / TOKENIZER).write_bytes(data)
        _fsync(self.tmp / TOKENIZER)
        self._files[TOKENIZER] = FileEntry(TOKENIZER, len(data), (Extent("tokenizer", 0, len(data), checksum(data)),))

    def add_expert(self, layer: int, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Quantise one expert and append its extent (head, then planes most significant first)."""
        encs = []
        for name, w, (_, shape) in zip(MATRICES, (gate, up, down), self.manifest.matrices):
            if tuple(w.shape) != tuple(shape):
                raise MoedError(f"layer {layer} expert {expert} {name} has shape {tuple(w.shape)}, expected {shape}")
            try:
                encs.append(self.scheme.encode(w.float(), self.manifest.group_size))
            except ValueError as e:
                raise MoedError(f"cannot quantise layer {layer} expert {expert} {name}: {e}") from None
        sums = []
        for s in range(self.layout.sections):
            data = b"".join(e.head_bytes() if s == 0 else e.plane_bytes(s - 1) for e in encs)
            padded = data + bytes(self.layout.section_length(s) - len(data))
            self._experts.write(padded)
            sums.append(checksum(padded))
        self._extents.append(ExpertExtent(layer, expert, self._pos, self.layout.length, tuple(sums)))
        self._pos += self.layout.length
        self.bytes_written += self.layout.length

    def commit(self) -> Path:
        """Write the manifest, flush everything to disk, and rename the directory to `out`."""
        self._experts.close()
        _fsync(self.tmp / EXPERTS)
        missing = {DENSE, TOKENIZER} - set(self._files)
        if missing:
            raise MoedError(f"store incomplete: {', '.join(sorted(missing))} not written", self.tmp)
        sections = tuple(self.layout.section_length(s) for s in range(self.layout.sections))
        m = replace(self.manifest, section_lengths=sections, files=dict(self._files),
                    experts_size=self._pos, experts=tuple(self._extents))
        assert len(sections) == PLANES + 1
        (self.tmp / MANIFEST).write_text(m.to_json(), encoding="utf-8")
        _fsync(self.tmp / MANIFEST)
        _fsync(self.tmp)
        old = None
        if self.out.exists():  # only with force (checked at start)
            old = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(4)}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        _fsync(self.out.parent)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        """Remove the partial directory."""
        if self._experts is not None and not self._experts.closed:
            self._experts.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
