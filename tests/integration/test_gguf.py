"""GGUF: moed's exporter and reader against llama.cpp (llama-cpp-python) on tiny models of every architecture."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from daemon import gguf_export
from daemon.errors import FormatError, MoedError, UnsupportedError
from daemon.generate import generate
from daemon.gguf_export import encode, export_gguf
from daemon.loaders.build import load_model
from daemon.loaders.gguf import GGUFCheckpoint
from daemon.models import SUPPORTED, architecture
from daemon.sampling import SamplingParams

TEXTS = [
    "The scheduler measures the cost of every expert on the machine at hand, then decides.",
    "naïve café ✓ — 3.14159 + 42 = 45.14159\n\tdef route(x):\n        return x[-1]",
    "  leading spaces, ÜBER-long Wörter, emoji 🙂 and CJK 专家混合\n\n\nlast line's end ",
    "<|im_start|>user\nWhich experts ran? 1234567<|im_end|>\n<|im_start|>assistant\n",
]
F32_VS_LLAMA = 1e-3  # llama.cpp with an F32 KV cache vs moed on the same F32 file (measured <= 3.1e-6)
GGUF_VS_HF = 1e-5  # moed on the F32 GGUF vs moed on the HF folder (measured 0.0: same float32 weights)
# moed vs llama.cpp on the same quantised file. llama.cpp quantises activations (Q8_0 / Q8_K dot products), and
# on random tiny MoEs a small change can flip a top-k choice, which moves a whole position's logits by ~1:
# so the bound is on the median and 90th percentile over positions of max|diff|, not on the max.
# Measured (5 archs, 96 tokens): Q8_0 median <= 0.048, p90 <= 0.059; Q4_K median <= 0.068, p90 <= 0.092;
# max 0.05-1.9 from routing flips. Bounds: about twice the worst measured.
QUANT_VS_LLAMA = {"Q8_0": (0.1, 0.15), "Q4_K": (0.15, 0.2)}
# moed on the quantised file vs moed on F32, same stats. Measured: Q8_0 median <= 0.054, p90 <= 0.064;
# Q4_K median <= 0.65, p90 <= 1.05 (4-bit random weights; max 2.0).
QUANT_VS_F32 = {"Q8_0": (0.1, 0.15), "Q4_K": (1.3, 2.0)}
F32 = 0  # GGML_TYPE_F32, for llama.cpp's KV cache (its F16 default alone costs ~1.5e-3 in the logits)


@pytest.fixture(scope="session")
def gguf_file(tiny_model, tmp_path_factory):
    """gguf_file(arch, qtype="F32") -> path of the tiny model of `arch` exported as GGUF (cached)."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, qtype: str = "F32") -> Path:
        if (arch, qtype) not in made:
            made[arch, qtype] = export_gguf(tiny_model(arch), root / f"{arch}-{qtype}.gguf", qtype)
        return made[arch, qtype]

    return get


@pytest.fixture(scope="session")
def gguf_loaded(gguf_file):
    """gguf_loaded(arch, qtype="F32") -> moed's LoadedModel of the exported GGUF (cached)."""
    cache: dict[tuple[str, str], object] = {}

    def get(arch: str, qtype: str = "F32"):
        if (arch, qtype) not in cache:
            cache[arch, qtype] = load_model(gguf_file(arch, qtype))
        return cache[arch, qtype]

    return get


def open_llama(path: Path):
    """llama.cpp on a GGUF file with logits for every position and an F32 KV cache."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2,
                           type_k=F32, type_v=F32)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


@torch.inference_mode()
def moed_logits(lm, ids: list[int]) -> np.ndarray:
    return lm.model(torch.tensor([ids]), lm.model.new_cache(len(ids)))[0].float().numpy()


def prompt(lm, n: int = 96) -> list[int]:
    ids = lm.tokenizer.encode(TEXTS[0] + " " + TEXTS[1] + TEXTS[2])
    assert len(ids) >= 64
    return ids[:n]


def position_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Median, 90th percentile and max over positions of max |a - b| over the vocabulary."""
    d = np.abs(a - b).max(axis=-1)
    return float(np.median(d)), float(np.quantile(d, 0.9)), float(d.max())


# --- export and reader, without llama.cpp ---

@pytest.mark.parametrize("arch", SUPPORTED)
def test_config_round_trip(arch, tiny_model, gguf_file):
    """The GGUF metadata maps back to the same model hyper-parameters as the HF config."""
    mod = architecture(arch)
    ckpt = GGUFCheckpoint(gguf_file(arch))
    from daemon.loaders.hf import HFCheckpoint
    want = mod.Args.from_config(HFCheckpoint(tiny_model(arch)).config)
    got = mod.Args.from_config(ckpt.config)
    diff = {f.name: (getattr(got, f.name), getattr(want, f.name)) for f in dataclasses.fields(want)
            if f.name != "raw" and getattr(got, f.name) != getattr(want, f.name)}
    assert not diff


@pytest.mark.parametrize("arch", SUPPORTED)
def test_gguf_logits_equal_hf(arch, loaded, gguf_loaded):
    hf, gg = loaded(arch), gguf_loaded(arch)
    ids = prompt(hf)
    assert np.abs(moed_logits(gg, ids) - moed_logits(hf, ids)).max() <= GGUF_VS_HF


@pytest.mark.parametrize("arch", SUPPORTED)
def test_gguf_tokenizer_equals_hf(arch, loaded, gguf_loaded):
    hf, gg = loaded(arch).tokenizer, gguf_loaded(arch).tokenizer
    for text in TEXTS:
        ids = hf.encode(text)
        assert gg.encode(text) == ids
        assert gg.decode(ids) == hf.decode(ids)
    assert gg.vocab_size == hf.vocab_size
    assert (gg.bos_id, gg.add_bos) == (hf.bos_id, hf.add_bos)
    assert set(gg.eos_ids) == set(hf.eos_ids) and gg.eos_ids[0] == gg.tok.token_to_id("<|endoftext|>")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which experts ran?"}]
    assert gg.apply_chat_template(msgs) == hf.apply_chat_template(msgs)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"])
def test_tensor_types_follow_llama_cpp_rules(qtype, gguf_file):
    """Norms, biases and routers stay F32; rows that do not fit the block fall back; the rest use qtype."""
    want = Q[qtype]
    types = {t.name: t.tensor_type for t in GGUFReader(gguf_file("qwen2_moe", qtype)).tensors}
    for name, t in types.items():
        if name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")):
            assert t == Q.F32, name
        else:
            assert t == want, name
    dsk = {t.name: t.tensor_type for t in GGUFReader(gguf_file("deepseek_v2", qtype)).tensors}
    # k_b rows are qk_nope_head_dim = 32 long: too short for a K-quant block, so Q8_0 (F16/BF16 unchanged)
    assert dsk["blk.0.attn_k_b.weight"] == (Q.Q8_0 if qtype.endswith("_K") else want)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
@pytest.mark.parametrize("arch", SUPPORTED)
def test_quantised_load_and_generate(arch, qtype, gguf_loaded, record_property):
    """moed runs quantised files: logits near F32's, and greedy decoding agrees with a full re-forward."""
    ref, lm = gguf_loaded(arch), gguf_loaded(arch, qtype)
    ids = prompt(ref)
    med, p90, mx = position_stats(moed_logits(lm, ids), moed_logits(ref, ids))
    record_property("vs_f32", {"median": med, "p90": p90, "max": mx})
    print(f"{arch} {qtype} vs F32: median {med:.4f} p90 {p90:.4f} max {mx:.4f}")
    assert med <= QUANT_VS_F32[qtype][0] and p90 <= QUANT_VS_F32[qtype][1]
    assert 0 < med  # the weights really are quantised
    out = [s.token for s in generate(lm, ids[:24], SamplingParams(max_tokens=12, ignore_eos=True))]
    assert len(out) == 12
    full = moed_logits(lm, ids[:24] + out)[23:-1]  # logits that chose each generated token
    for step, (tok, row) in enumerate(zip(out, full)):
        top2 = np.sort(row)[-2:]
        assert tok == int(row.argmax()) or top2[1] - top2[0] < 1e-4, f"step {step}"


def test_export_is_atomic(tiny_model, tmp_path, monkeypatch):
    """A failed export leaves neither the output nor a temporary file behind."""
    def boom(x, qtype):
        raise RuntimeError("disk full")
    monkeypatch.setattr(gguf_export, "encode", boom)
    out = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tiny_model("qwen3_moe"), out, "Q8_0")
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_unknown_qtype(tiny_model, tmp_path):
    with pytest.raises(MoedError, match="Q3_K"):
        export_gguf(tiny_model("qwen3_moe"), tmp_path / "m.gguf", "Q3_K")


# --- bad files ---

def copy_of(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def test_truncated_file_names_file_and_tensor(gguf_file, tmp_path):
    bad = copy_of(gguf_file("qwen3_moe"), tmp_path / "cut.gguf")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    with pytest.raises(FormatError) as e:
        load_model(bad)
    assert str(bad) in str(e.value) and "runs past the end" in str(e.value) and "blk." in str(e.value)


@pytest.mark.parametrize("size", [10, 24, 4000])
def test_truncated_header(gguf_file, tmp_path, size):
    bad = copy_of(gguf_file("qwen3_moe"), tmp_path / "head.gguf")
    with open(bad, "r+b") as f:
        f.truncate(size)
    with pytest.raises(FormatError) as e:
        GGUFCheckpoint(bad)
    assert str(bad) in str(e.value)


def test_bad_magic(gguf_file, tmp_path):
    bad = copy_of(gguf_file("qwen3_moe"), tmp_path / "magic.gguf")
    with open(bad, "r+b") as f:
        f.write(b"GGUX")
    with pytest.raises(FormatError, match="magic") as e:
        GGUFCheckpoint(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(FormatError, match="magic") as e:  # a .gguf goes to the GGUF reader whatever its magic
        load_model(bad)
    assert str(bad) in str(e.value)


def test_bad_version(gguf_file, tmp_path):
    bad = copy_of(gguf_file("qwen3_moe"), tmp_path / "version.gguf")
    with open(bad, "r+b") as f:
        f.seek(4)
        f.write((99).to_bytes(4, "little"))
    with pytest.raises(FormatError, match="version 99") as e:
        load_model(bad)
    assert str(bad) in str(e.value)


def test_unsupported_tensor_type_names_file_tensor_type(gguf_file, tmp_path, patch_gguf_tensor):
    bad = copy_of(gguf_file("qwen3_moe"), tmp_path / "q2k.gguf")
    patch_gguf_tensor(bad, "blk.1.attn_q.weight", 4, int(Q.Q2_K))  # smaller than the F32 data: still in bounds
    with pytest.raises(UnsupportedError) as e:
        load_model(bad)
    msg = str(e.value)
    assert str(bad) in msg and "blk.1.attn_q.weight" in msg and "Q2_K" in msg


def test_unknown_tensor_type_id(gguf_file, tmp_path, patch_gguf_tensor):
    bad = copy_of(gguf_file("qwen3_moe"), tmp_path / "type.gguf")
    patch_gguf_tensor(bad, "output_norm.weight", 4, 200)
    with pytest.raises(FormatError, match="output_norm.weight") as e:
        GGUFCheckpoint(bad)
    assert str(bad) in str(e.value)


def test_huge_metadata_array_count(gguf_file, tmp_path):
    """A corrupt array length is an error at once, not a loop over 2**40 phantom items."""
    bad = copy_of(gguf_file("qwen3_moe"), tmp_path / "count.gguf")
    r = GGUFReader(bad, "r+")
    r.fields["tokenizer.ggml.token_type"].parts[4][0] = 2 ** 40  # parts: key len, key, type, item type, count
    r.data.flush()
    del r
    with pytest.raises(FormatError, match="claims 1099511627776 items") as e:
        GGUFCheckpoint(bad)
    assert str(bad) in str(e.value)


def test_tensor_offset_past_end(gguf_file, tmp_path, patch_gguf_tensor):
    bad = copy_of(gguf_file("qwen3_moe"), tmp_path / "offset.gguf")
    patch_gguf_tensor(bad, "blk.0.ffn_down_exps.weight", 5, os.path.getsize(bad) // 32 * 32 + 32)  # aligned
    with pytest.raises(FormatError, match="blk.0.ffn_down_exps.weight") as e:
        load_model(bad)
    assert str(bad) in str(e.value) and "runs past the end" in str(e.value)


# --- against llama.cpp ---

@pytest.mark.llama
@pytest.mark.parametrize("arch", SUPPORTED)
def test_tokenisation_matches_llama_cpp(arch, loaded, gguf_loaded, gguf_file):
    llm = open_llama(gguf_file(arch))
    hf, gg = loaded(arch).tokenizer, gguf_loaded(arch).tokenizer
    try:
        for text in TEXTS:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # add_bos: as the file says
            assert ids == gg.encode(text) == hf.encode(text), repr(text)
            if "<|" not in text:
                assert llm.detokenize(ids).decode("utf-8") == gg.decode(ids)
    finally:
        llm.close()


@pytest.mark.llama
@pytest.mark.parametrize("pre", ["qwen2", "gpt-2", "olmo", "llama-bpe", "deepseek-llm", "default"])
def test_pre_tokenizers_match_llama_cpp(pre, tiny_model, tmp_path, monkeypatch):
    """Every pre-tokenizer moed reads splits text as llama.cpp does (same vocabulary, only the name differs)."""
    monkeypatch.setattr(gguf_export, "_pre_name", lambda *_: pre)
    path = export_gguf(tiny_model("qwen3_moe"), tmp_path / f"{pre}.gguf", "F32")
    tok = GGUFCheckpoint(path).tokenizer()
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    extra = ["I'll've DON'T it's 1234567 $100,000 !!!??? <a href=\"x\">ÀÉÎ ώ Ω K</a>   \r\n  \t x"]
    try:
        for text in TEXTS + extra:
            assert tok.encode(text) == llm.tokenize(text.encode("utf-8"), add_bos=True, special=True), repr(text)
    finally:
        llm.close()


@pytest.mark.llama
@pytest.mark.parametrize("arch", SUPPORTED)
def test_logits_match_llama_cpp(arch, gguf_loaded, gguf_file, record_property):
    lm = gguf_loaded(arch)
    ids = prompt(lm)
    llm = open_llama(gguf_file(arch))
    try:
        diff = float(np.abs(llama_logits(llm, ids) - moed_logits(lm, ids)).max())
    finally:
        llm.close()
    record_property("max_abs_diff", diff)
    print(f"{arch} F32 moed vs llama.cpp: {diff:.2e}")
    assert diff <= F32_VS_LLAMA


@pytest.mark.llama
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
@pytest.mark.parametrize("arch", SUPPORTED)
def test_quantised_logits_near_llama_cpp(arch, qtype, gguf_loaded, gguf_file, record_property):
    lm = gguf_loaded(arch, qtype)
    ids = prompt(lm)
    llm = open_llama(gguf_file(arch, qtype))
    try:
        med, p90, mx = position_stats(llama_logits(llm, ids), moed_logits(lm, ids))
    finally:
        llm.close()
    record_property("vs_llama", {"median": med, "p90": p90, "max": mx})
    print(f"{arch} {qtype} moed vs llama.cpp: median {med:.4f} p90 {p90:.4f} max {mx:.4f}")
    assert med <= QUANT_VS_LLAMA[qtype][0] and p90 <= QUANT_VS_LLAMA[qtype][1]


@pytest.mark.llama
@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q5_K", "Q6_K"])
def test_other_types_load_in_both(qtype, gguf_file, record_property):
    """Every export type loads in llama.cpp and in moed, and the two agree about as well as Q8_0/Q4_K do."""
    path = gguf_file("qwen3_moe", qtype)
    lm = load_model(path)
    ids = prompt(lm)
    llm = open_llama(path)
    try:
        med, p90, mx = position_stats(llama_logits(llm, ids), moed_logits(lm, ids))
    finally:
        llm.close()
    print(f"qwen3_moe {qtype} moed vs llama.cpp: median {med:.4f} p90 {p90:.4f} max {mx:.4f}")
    assert med <= 0.1 and p90 <= 0.15


# --- bit-exactness against libggml (the C library llama-cpp-python ships) ---

BLOCK_BYTES = {Q.Q4_0: 18, Q.Q8_0: 34, Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}
BLOCK = {Q.Q4_0: 32, Q.Q8_0: 32, Q.Q4_K: 256, Q.Q5_K: 256, Q.Q6_K: 256}


def _c_name(q: Q) -> str:
    """ggml's spelling in function names: q4_K, q8_0."""
    return q.name.lower().replace("_k", "_K")


@pytest.fixture(scope="module")
def libggml():
    """libggml-base from the llama-cpp-python wheel, with the reference (de)quantisers' signatures."""
    llama_cpp = pytest.importorskip("llama_cpp")
    found = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not found:
        pytest.skip("libggml-base not found next to llama_cpp")
    lib = ctypes.CDLL(str(found[0]))
    for q in BLOCK_BYTES:
        for fn in (f"quantize_row_{_c_name(q)}_ref", f"dequantize_row_{_c_name(q)}"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def hard_rows() -> np.ndarray:
    """Rows of 256 that exercise the quantisers' corner cases (zeros, constants, outliers, sparse, tiny)."""
    g = np.random.default_rng(7)
    rows = [g.standard_normal(256), 0.02 * g.standard_normal(256), np.abs(g.standard_normal(256)) + 1,
            g.standard_t(2, 256), np.zeros(256), np.full(256, -0.5), g.standard_normal(256) * (g.random(256) < 0.05),
            1e-20 * g.standard_normal(256), np.r_[np.zeros(128), g.standard_normal(128)]]
    rows += list(g.standard_normal((247, 256)) * g.uniform(0.001, 3, (247, 1)))
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.llama
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_quantisers_bit_exact_with_libggml(qtype, libggml):
    x = hard_rows()
    ours = encode(x, qtype)
    ref = np.zeros(x.size // BLOCK[qtype] * BLOCK_BYTES[qtype], dtype=np.uint8)
    getattr(libggml, f"quantize_row_{_c_name(qtype)}_ref")(x.ctypes.data, ref.ctypes.data, x.size)
    assert ours.nbytes == ref.nbytes
    bad = np.flatnonzero((ours.reshape(-1, BLOCK_BYTES[qtype]) != ref.reshape(-1, BLOCK_BYTES[qtype])).any(1))
    assert bad.size == 0, f"{bad.size} blocks differ, first {bad[:5]}"


@pytest.mark.llama
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_reader_dequantises_like_libggml(qtype, gguf_file, libggml):
    """The tensors moed reads from a quantised file are exactly what libggml decodes from the same bytes."""
    path = gguf_file("mixtral", qtype)
    ckpt = GGUFCheckpoint(path)
    raw = {t.name: t for t in GGUFReader(path).tensors}
    t = raw["blk.1.ffn_down_exps.weight"]
    assert t.tensor_type == Q[qtype]
    ref = np.zeros(t.n_elements, dtype=np.float32)
    data = np.ascontiguousarray(t.data)
    getattr(libggml, f"dequantize_row_{_c_name(t.tensor_type)}")(data.ctypes.data, ref.ctypes.data, t.n_elements)
    got = ckpt.experts(1, "", ("w1", "w3", "w2"), 8).down
    assert torch.equal(got.reshape(-1), torch.from_numpy(ref))
    assert np.array_equal(dequantize(t.data, t.tensor_type).reshape(-1), ref)
