"""A corrupt, truncated, foreign or inconsistent model directory is an error naming the file and the
extent, never a silent wrong answer; a killed conversion leaves nothing at OUT that loads."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from daemon.convert import convert
from daemon.errors import FormatError, MoedError
from daemon.loaders.build import load_model
from offload.manifest import Manifest
from offload.provider import StoreExperts
from offload.store import Store

ARCH = "qwen3_moe"
MOED = [sys.executable, "-m", "daemon.cli"]


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory) -> Path:
    return convert(tiny_model(ARCH), tmp_path_factory.mktemp("conv") / "store")


@pytest.fixture()
def copy(converted, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(converted, dst)
    return dst


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def expert_extent_at(store_dir: Path, offset: int) -> str:
    """The extent name the store must report for a byte of experts.bin."""
    m = Manifest.read(store_dir / "manifest.json")
    for x in m.experts:
        if x.offset <= offset < x.offset + x.length:
            at = x.offset
            for s, n in enumerate(m.section_lengths):
                if at <= offset < at + n:
                    return f"extent layer {x.layer} expert {x.expert} {'head' if s == 0 else f'plane {s - 1}'}"
                at += n
    raise AssertionError(offset)


def file_extent_at(store_dir: Path, name: str, offset: int) -> str:
    m = Manifest.read(store_dir / "manifest.json")
    for e in m.files[name].extents:
        if e.offset <= offset < e.offset + e.length:
            return f"extent {e.name}"
    raise AssertionError(offset)


def experts_offsets(size: int) -> list[int]:
    """First byte, last byte (padding of the last plane), and spread positions in between."""
    return [0, 1, size // 7, size // 3 + 4097, size // 2, size - 4096 * 3 - 1, size - 1]


def test_every_byte_is_covered_by_a_checksummed_extent(converted):
    m = Manifest.read(converted / "manifest.json")
    assert sum(x.length for x in m.experts) == m.experts_size == (converted / "experts.bin").stat().st_size
    for f in m.files.values():
        assert sum(e.length for e in f.extents) == f.size == (converted / f.name).stat().st_size


@pytest.mark.parametrize("which", range(7))
def test_flipped_byte_in_experts_fails_loading_naming_the_extent(copy, which):
    path = copy / "experts.bin"
    offset = experts_offsets(path.stat().st_size)[which]
    flip(path, offset)
    with pytest.raises(FormatError) as e:
        load_model(copy, bits=8)  # loading at 8 bits reads, and checks, every byte of every expert
    msg = str(e.value)
    assert "experts.bin" in msg and expert_extent_at(copy, offset) in msg and "checksum mismatch" in msg, msg


def test_flipped_byte_fails_first_use_of_that_expert(copy):
    path = copy / "experts.bin"
    store = Store(copy)
    x = store.extent(store.layers[1], 6)
    flip(path, x.offset + store.layout.section_offset(2) + 10)  # plane 1 of that expert
    provider = StoreExperts(Store(copy), bits=4)
    provider.ensure(store.layers[1], 5)  # its neighbours are fine
    with pytest.raises(FormatError, match=f"extent layer {store.layers[1]} expert 6 plane 1"):
        provider.ensure(store.layers[1], 6)
    StoreExperts(Store(copy), bits=1).ensure(store.layers[1], 6)  # a 1-bit view never reads plane 1


@pytest.mark.parametrize("where", ["start", "header", "tensor", "last"])
def test_flipped_byte_in_dense_fails_loading_naming_the_extent(copy, where):
    path = copy / "dense.safetensors"
    size = path.stat().st_size
    header = int.from_bytes(path.read_bytes()[:8], "little")
    offset = {"start": 0, "header": 8 + header // 2, "tensor": size // 2, "last": size - 1}[where]
    flip(path, offset)
    with pytest.raises(FormatError) as e:
        load_model(copy)
    msg = str(e.value)
    assert "dense.safetensors" in msg and file_extent_at(copy, "dense.safetensors", offset) in msg, msg


def test_flipped_byte_in_the_embedding_left_in_the_file_fails_loading(copy):
    """The embedding table stays in the file (rows read on use); it is still verified, whole, at load."""
    m = Manifest.read(copy / "manifest.json")
    emb = next(e for e in m.files["dense.safetensors"].extents if e.name == "model.embed_tokens.weight")
    flip(copy / "dense.safetensors", emb.offset + emb.length - 3)
    with pytest.raises(FormatError, match="dense.safetensors.*extent model.embed_tokens.weight.*checksum mismatch"):
        load_model(copy, bits=8)


def test_flipped_byte_in_a_matrix_quantised_in_row_blocks_fails_loading(copy, monkeypatch):
    """With --dense-bits 8 a large matrix (here lm_head, with a lowered threshold) is read once, in blocks of
    rows, its checksum checked as they stream: the last block fails naming the extent."""
    import daemon.models.qdense as qd
    monkeypatch.setattr(qd, "BLOCK_CODES", 4096)
    m = Manifest.read(copy / "manifest.json")
    head = next(e for e in m.files["dense.safetensors"].extents if e.name == "lm_head.weight")
    flip(copy / "dense.safetensors", head.offset + 5)
    with pytest.raises(FormatError, match="dense.safetensors.*extent lm_head.weight.*checksum mismatch"):
        load_model(copy, bits=8, dense_bits=8)


def test_flipped_byte_in_tokenizer_fails_loading(copy):
    flip(copy / "tokenizer.json", 100)
    with pytest.raises(FormatError, match="tokenizer.json.*extent tokenizer"):
        load_model(copy)


@pytest.mark.parametrize("name", ["experts.bin", "dense.safetensors"])
def test_truncated_file_is_an_error(copy, name):
    path = copy / name
    path.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(FormatError, match=f"{name}: file is .* manifest says"):
        load_model(copy)


def edit_manifest(store: Path, fn) -> None:
    d = json.loads((store / "manifest.json").read_text())
    fn(d)
    (store / "manifest.json").write_text(json.dumps(d))


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.update(format_version=99), "unknown format version 99"),
    (lambda d: d["files"]["experts.bin"]["sections"].__setitem__(1, 8192), "section lengths"),
    (lambda d: d["files"]["experts.bin"]["extents"][3].update(offset=100), "extent layer 0 expert 3"),
    (lambda d: d["files"]["experts.bin"]["extents"].pop(), "experts in the store but the config says"),
    (lambda d: d["config"].update(num_experts=16), "config implies"),
    (lambda d: d["config"].update(moe_intermediate_size=128), "disagree with the config"),
    (lambda d: d["quant"].update(scheme="nf4"), "unknown quantisation scheme"),
    (lambda d: d["files"]["dense.safetensors"]["extents"].pop(1), "does not continue"),
    (lambda d: d.pop("files"), "lacks field 'files'"),
])
def test_manifest_that_disagrees_with_the_files_is_an_error(copy, change, needle):
    edit_manifest(copy, change)
    with pytest.raises(FormatError, match=needle):
        load_model(copy)


def test_cli_exits_2_with_one_line_naming_the_extent(copy):
    path = copy / "experts.bin"
    offset = path.stat().st_size // 2
    flip(path, offset)
    r = subprocess.run([*MOED, "generate", "--model", str(copy), "--bits", "8", "--prompt", "x"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moed: error: ") and "Traceback" not in r.stderr
    assert str(path) in lines[0] and expert_extent_at(copy, offset) in lines[0]


# Runs a real conversion that SIGKILLs itself after `n` experts are written (deterministic, unlike a
# kill from outside racing the writer): n = 1, half, all (just before the manifest and rename).
KILL_AFTER = """
import os, signal, sys
from daemon.convert import convert
n = int(sys.argv[3])
def progress(done, total, nbytes):
    if done == (n if n > 0 else total):
        os.kill(os.getpid(), signal.SIGKILL)
convert(sys.argv[1], sys.argv[2], progress=progress)
"""


@pytest.mark.slow
def test_conversion_killed_with_sigkill_leaves_nothing_that_loads(tmp_path):
    from daemon.tiny import make_tiny_model
    src = make_tiny_model(ARCH, tmp_path / "src", config={"num_experts": 8, "num_hidden_layers": 2})
    out = tmp_path / "out"
    for n in (1, 8, 0):  # first expert, half of the 16, all of them
        r = subprocess.run([sys.executable, "-c", KILL_AFTER, str(src), str(out), str(n)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr)
        assert not out.exists(), n
        with pytest.raises(MoedError):
            load_model(out)
        for d in tmp_path.iterdir():  # whatever was left is hidden and incomplete
            if d.name.startswith(".out."):
                assert not (d / "manifest.json").exists()
                with pytest.raises(MoedError):
                    load_model(d)
    r = subprocess.run([*MOED, "convert", str(src), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # the same conversion, left alone, completes and loads
    assert load_model(out, bits=2).experts.bits == 2


@pytest.mark.parametrize("verify_once", [True, False])
def test_a_section_is_verified_on_its_first_read_and_again_only_when_asked(copy, verify_once):
    """verify_once (the default) checks each section the first time it is read; a byte damaged after that
    is caught again only with verify_once=False, which checks every read."""
    store = Store(copy, verify_once=verify_once)
    layer = store.layers[0]
    x = store.extent(layer, 2)
    store.read_expert(layer, 2, 8)  # verified here
    flip(copy / "experts.bin", x.offset + store.layout.section_offset(1) + 3)  # plane 0, after the first read
    if verify_once:
        store.read_expert(layer, 2, 8)  # not checked again
    else:
        with pytest.raises(FormatError, match=f"extent layer {layer} expert 2 plane 0"):
            store.read_expert(layer, 2, 8)
    with pytest.raises(FormatError, match=f"extent layer {layer} expert 2 plane 0"):
        Store(copy).read_expert(layer, 2, 8)  # a fresh store checks it on its first read


def test_dense_tensors_are_read_one_at_a_time_and_unread_extents_still_checked(copy):
    """The loader reads each dense tensor with its own read; extents no tensor() asked for are verified
    by check_unread, so a damaged byte in a tensor the model never uses still fails loading."""
    store = Store(copy)
    dense = store.dense()
    name = dense.names[0]
    assert torch.equal(dense.tensor(name), store.dense_tensors()[name]) and dense.tensor("nope") is None
    e = next(e for e in store.manifest.files["dense.safetensors"].extents if e.name == dense.names[-1])
    flip(copy / "dense.safetensors", e.offset + e.length // 2)
    d = Store(copy).dense()
    d.tensor(name)  # another tensor: fine
    with pytest.raises(FormatError, match=f"extent {dense.names[-1]}"):
        d.check_unread()


def test_store_checksum_is_zlib_crc32_whichever_library_computes_it():
    """Stores written by any moed version stay readable: the checksum is zlib's crc32, chained, bit for bit
    (zlib-ng's vectorised crc32 where installed)."""
    import random
    import zlib

    from offload.manifest import checksum, running_checksum
    rng = random.Random(5)
    for n in (0, 1, 7, 4096, 1 << 20, (6 << 20) + 3):
        data = rng.randbytes(n)
        start = rng.getrandbits(32)
        assert running_checksum(data, start) == zlib.crc32(data, start)
        assert running_checksum(memoryview(data)[n // 2:], running_checksum(data[:n // 2])) == zlib.crc32(data)
        assert checksum(data) == f"{zlib.crc32(data):08x}"
