"""Write a llama.cpp-loadable GGUF file from a Hugging Face model folder, one tensor at a time."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (GGML_QUANT_SIZES, ExpertGatingFuncType, GGMLQuantizationType, GGUFWriter, LlamaFileType,
                  RopeScalingType, TokenType)
from gguf.quants import quantize

from daemon.errors import MoedError, UnsupportedError
from daemon.loaders.build import hf_names
from daemon.loaders.gguf import BY_MODEL_TYPE, EXPERT_TENSORS, TOP_NAMES, ArchSpec, layer_names, permute_qk
from daemon.loaders.hf import HFCheckpoint
from daemon.models import architecture
from daemon.models.args import ModelArgs
from daemon.tokenizer import Tokenizer

T = GGMLQuantizationType
QTYPES: dict[str, T] = {q.name: q for q in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K)}
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
              T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0,
              T.Q4_K: LlamaFileType.MOSTLY_Q4_K_S, T.Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
              T.Q6_K: LlamaFileType.MOSTLY_Q6_K}
# Kept in float32 whatever the file type, as llama.cpp's converter and quantizer do.
F32_SUFFIXES = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "exp_probs_b.bias")
CHUNK = 1 << 22  # elements quantised at a time (bounds the temporaries of the K-quant search)
_HF_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
PRE_BY_REGEX = {_HF_QWEN2: "qwen2", _HF_QWEN2.replace(r"\p{N}|", r"\p{N}{1,3}|"): "llama-bpe"}  # HF Split -> llama.cpp


@dataclass(frozen=True, slots=True)
class Planned:
    """One tensor of the output file: its llama.cpp name, shape (rows last), type, and a reader of its rows."""

    name: str
    shape: tuple[int, ...]
    qtype: T
    read: Callable[[], Iterator[np.ndarray]]  # float32 pieces that concatenate (axis 0) to `shape`

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded tensor."""
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * size


def export_gguf(hf_folder: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "F32") -> Path:
    """Write a llama.cpp-loadable GGUF of a model folder; qtype: F32 F16 BF16 Q8_0 Q4_0 Q4_K Q5_K Q6_K."""
    want = QTYPES.get(qtype.upper())
    if want is None:
        raise MoedError(f"unknown GGUF type {qtype!r} (choose from {', '.join(QTYPES)})")
    folder, out = Path(hf_folder), Path(out_path)
    ckpt = HFCheckpoint(folder)
    model_type = ckpt.config.get("model_type")
    spec = BY_MODEL_TYPE.get(model_type)
    if spec is None:
        raise UnsupportedError(f"no GGUF export for model_type {model_type!r}", folder)
    arch = architecture(model_type, str(folder))
    args = arch.Args.from_config(ckpt.config, str(folder))
    _check_llama_cpp_semantics(spec, args, folder)
    plan = plan_tensors(ckpt, arch, args, spec, want)
    tok = Tokenizer.from_hf_folder(folder, ckpt.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(None, spec.gguf_arch)
    try:
        _write_metadata(writer, spec, args, folder.name, want)
        _write_vocab(writer, tok, folder, args.vocab_size)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for t in plan:
            _pad(fout, writer.data_alignment)
            written = 0
            for piece in t.read():
                data = encode(piece, t.qtype)
                data.tofile(fout)
                written += data.nbytes
            if written != t.nbytes:
                raise MoedError(f"tensor {t.name}: wrote {written} bytes, expected {t.nbytes}", folder)
        _pad(fout, writer.data_alignment)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _pad(f, align: int) -> None:
    f.write(b"\0" * (-f.tell() % align))


def _check_llama_cpp_semantics(spec: ArchSpec, a: ModelArgs, folder: Path) -> None:
    """Refuse what llama.cpp would silently compute differently."""
    if spec.norm_topk is not None and bool(a.norm_topk_prob) != spec.norm_topk and spec.gguf_arch != "llama":
        raise UnsupportedError(f"norm_topk_prob={a.norm_topk_prob}, but llama.cpp's {spec.gguf_arch} always uses "
                               f"{spec.norm_topk}", folder)
    if spec.gguf_arch in ("qwen3moe", "qwen2moe") and (a.mlp_only_layers or a.decoder_sparse_step != 1):
        raise UnsupportedError(f"dense layers (mlp_only_layers={list(a.mlp_only_layers)}, decoder_sparse_step="
                               f"{a.decoder_sparse_step}): llama.cpp's {spec.gguf_arch} has MoE in every layer", folder)
    if getattr(a, "clip_qkv", None) is not None:
        raise UnsupportedError(f"clip_qkv={a.clip_qkv}: llama.cpp's {spec.gguf_arch} does not clip", folder)
    if spec.gguf_arch == "olmoe" and a.num_key_value_heads != a.num_attention_heads:
        raise UnsupportedError("llama.cpp's olmoe needs num_key_value_heads == num_attention_heads", folder)
    if spec.gguf_arch == "deepseek2" and (a.scoring_func != "softmax" or a.topk_method != "greedy"):
        raise UnsupportedError(f"deepseek2 routing {a.topk_method}/{a.scoring_func}: moed exports greedy softmax "
                               f"routing only (llama.cpp groups experts differently)", folder)
    if getattr(a, "sliding_window", None):
        raise UnsupportedError(f"sliding_window={a.sliding_window}: llama.cpp's llama arch has none", folder)


def tensor_type(name: str, shape: tuple[int, ...], want: T) -> T:
    """The type a tensor is stored in: `want`, or F32 for norms/routers/1-D, or a fallback for odd row lengths."""
    if want == T.F32 or len(shape) == 1 or name.endswith(F32_SUFFIXES):
        return T.F32
    if shape[-1] % GGML_QUANT_SIZES[want][0] == 0:
        return want
    return T.Q8_0 if want not in (T.F16, T.BF16) and shape[-1] % 32 == 0 else T.F32


def plan_tensors(ckpt: HFCheckpoint, arch, args: ModelArgs, spec: ArchSpec, want: T) -> list[Planned]:
    """Every tensor of the GGUF file in llama.cpp's naming, in layer order, reading lazily from the checkpoint."""
    renames = getattr(arch, "RENAMES", ())
    with torch.device("meta"):
        model = arch.Model(args)
    per_layer = {hf: g for g, hf in layer_names(spec)}
    top = {hf: g for g, hf in TOP_NAMES}
    head: list[Planned] = []
    tail: list[Planned] = []
    layers: dict[int, list[Planned]] = {i: [] for i in range(args.num_hidden_layers)}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and args.tie_word_embeddings:
            name = "model.embed_tokens.weight"  # llama.cpp's qwen2moe/olmoe need output.weight: write a copy
            gname = "output.weight"
        else:
            gname = None
        cands = hf_names(name, renames)
        hub = cands[-1]
        if gname is None and hub in top:
            gname = top[hub]
        parts = hub.split(".", 3)
        if gname is None and parts[:2] == ["model", "layers"] and parts[3] in per_layer:
            gname = f"blk.{parts[2]}.{per_layer[parts[3]]}"
        if gname is None:
            raise UnsupportedError(f"no llama.cpp tensor name for {hub}", ckpt.path)
        shape = tuple(p.shape)
        if spec.gguf_arch == "deepseek2" and gname.endswith("attn_kv_b.weight"):
            layers[int(parts[2])] += _split_kv_b(ckpt, cands, gname, args, want)
            continue
        t = Planned(gname, shape, tensor_type(gname, shape, want), _reader(ckpt, cands, gname, spec, args))
        if gname.startswith("blk."):
            layers[int(parts[2])].append(t)
        else:
            (head if gname == "token_embd.weight" else tail).append(t)
    e, d, inter = args.num_experts, args.hidden_size, args.moe_intermediate_size
    for i in model.moe_layers:
        prefix = hf_names(f"model.layers.{i}.mlp.experts", renames)[-1]
        for k, (gsuffix, shape) in enumerate(zip(EXPERT_TENSORS, ((e, inter, d), (e, inter, d), (e, d, inter)))):
            gname = f"blk.{i}.{gsuffix}"
            layers[i].append(Planned(gname, shape, tensor_type(gname, shape, want),
                                     _expert_reader(ckpt, prefix, arch.EXPERT_NAMES, k, e)))
    return head + [t for i in sorted(layers) for t in layers[i]] + tail


def _load(ckpt: HFCheckpoint, cands: list[str]) -> torch.Tensor:
    x = next((t for t in map(ckpt.tensor, cands) if t is not None), None)
    if x is None:
        raise MoedError(f"tensor {cands[-1]} is missing", ckpt.path)
    return x.float()


def _split_kv_b(ckpt: HFCheckpoint, cands: list[str], gname: str, a, want: T) -> list[Planned]:
    """DeepSeek's kv_b_proj as llama.cpp's MLA wants it: k_b [H, kv_lora, nope] and v_b [H, v, kv_lora]."""
    h, nope, v, r = a.num_attention_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank

    def part(k: bool):
        def read() -> Iterator[np.ndarray]:
            kv = _load(ckpt, cands).view(h, nope + v, r)
            yield (kv[:, :nope].transpose(1, 2) if k else kv[:, nope:]).contiguous().numpy()
        return read

    out = []
    for name, shape, k in ((gname.replace("kv_b", "k_b"), (h, r, nope), True),
                           (gname.replace("kv_b", "v_b"), (h, v, r), False)):
        out.append(Planned(name, shape, tensor_type(name, shape, want), part(k)))
    return out


def _reader(ckpt: HFCheckpoint, cands: list[str], gname: str, spec: ArchSpec, args: ModelArgs):
    def read() -> Iterator[np.ndarray]:
        x = _load(ckpt, cands)
        if spec.permute_qk and gname.endswith(("attn_q.weight", "attn_q.bias")):
            x = permute_qk(x, args.num_attention_heads)
        elif spec.permute_qk and gname.endswith(("attn_k.weight", "attn_k.bias")):
            x = permute_qk(x, args.num_key_value_heads)
        yield x.numpy()
    return read


def _expert_reader(ckpt: HFCheckpoint, prefix: str, names: tuple[str, str, str], part: int, n_experts: int):
    def read() -> Iterator[np.ndarray]:
        if ckpt.tensor(f"{prefix}.0.{names[0]}.weight") is not None:
            for e in range(n_experts):
                x = ckpt.tensor(f"{prefix}.{e}.{names[part]}.weight")
                if x is None:
                    raise MoedError(f"tensor {prefix}.{e}.{names[part]}.weight is missing", ckpt.path)
                yield x.float().numpy()[None]
            return
        fused = ckpt.tensor(f"{prefix}.down_proj" if part == 2 else f"{prefix}.gate_up_proj")
        if fused is None:
            raise MoedError(f"routed experts {prefix}.* are missing", ckpt.path)
        if part < 2:  # transformers 5 fused [E, 2I, D]
            fused = fused.chunk(2, dim=1)[part]
        for e in range(n_experts):
            yield fused[e:e + 1].float().numpy()
    return read


def encode(x: np.ndarray, qtype: T) -> np.ndarray:
    """The bytes (or floats) llama.cpp stores for float32 rows `x` in `qtype`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == T.F32:
        return x
    if qtype == T.F16:
        return x.astype(np.float16)
    kq = K_QUANTIZERS.get(qtype)
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, CHUNK // x.shape[-1])
    out = []
    for r in range(0, rows.shape[0], step):
        chunk = rows[r:r + step]
        if kq is None:
            q = quantize(chunk, qtype)
            if qtype == T.Q4_0:  # ggml writes d = 0/-8 = -0.0 for an all-zero block; gguf-py's sign follows x[0]
                q = q.reshape(-1, 18)
                q[~np.abs(chunk.reshape(-1, 32)).any(axis=1), :2] = np.frombuffer(np.float16(-0.0).tobytes(), np.uint8)
            out.append(q.reshape(-1))
        else:
            out.append(kq(chunk.reshape(-1, 256)).reshape(-1))
    return np.concatenate(out)


def _write_metadata(w: GGUFWriter, spec: ArchSpec, a: ModelArgs, name: str, want: T) -> None:
    w.add_name(name)
    w.add_file_type(FILE_TYPES[want])
    if want not in (T.F32, T.F16, T.BF16):
        w.add_quantization_version(2)
    w.add_vocab_size(a.vocab_size)
    w.add_context_length(a.max_position_embeddings)
    w.add_embedding_length(a.hidden_size)
    w.add_block_count(a.num_hidden_layers)
    w.add_head_count(a.num_attention_heads)
    w.add_head_count_kv(1 if spec.gguf_arch == "deepseek2" else a.num_key_value_heads)  # MLA runs as MQA
    w.add_layer_norm_rms_eps(a.rms_norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_expert_count(a.num_experts)
    w.add_expert_used_count(a.num_experts_per_tok)
    if spec.gguf_arch == "deepseek2":
        _deepseek2_metadata(w, a)
        return
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_rope_dimension_count(a.head_dim)
    if spec.gguf_arch in ("qwen3moe", "qwen2moe"):
        w.add_feed_forward_length(a.intermediate_size)
        w.add_expert_feed_forward_length(a.moe_intermediate_size)
    else:  # llama (Mixtral), olmoe: the experts are the MLPs
        w.add_feed_forward_length(a.moe_intermediate_size)
    if spec.gguf_arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(a.shared_expert_intermediate_size)
    if a.rope_scaling:
        raise UnsupportedError(f"rope scaling {a.rope_scaling} for {spec.gguf_arch} export")


def _deepseek2_metadata(w: GGUFWriter, a) -> None:
    w.add_feed_forward_length(a.intermediate_size)
    w.add_expert_feed_forward_length(a.moe_intermediate_size)
    w.add_leading_dense_block_count(a.first_k_dense_replace)
    w.add_expert_shared_count(a.n_shared_experts)
    w.add_expert_weights_scale(a.routed_scaling_factor)
    w.add_expert_weights_norm(bool(a.norm_topk_prob))
    w.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX)
    w.add_q_lora_rank(a.q_lora_rank or 0)  # llama.cpp needs the key unless it guesses "Lite" from 27 layers
    w.add_kv_lora_rank(a.kv_lora_rank)
    # as convert_hf_to_gguf writes MLA: compressed widths, then the per-head ones
    w.add_key_length(a.kv_lora_rank + a.qk_rope_head_dim)
    w.add_value_length(a.kv_lora_rank)
    w.add_key_length_mla(a.qk_nope_head_dim + a.qk_rope_head_dim)
    w.add_value_length_mla(a.v_head_dim)
    w.add_rope_dimension_count(a.qk_rope_head_dim)
    rs = a.rope_scaling or {}
    if (rs.get("rope_type") or rs.get("type")) == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rs.get("mscale_all_dim") or 0.0))
    elif rs:
        raise UnsupportedError(f"rope scaling {rs} for deepseek2 export")


def _write_vocab(w: GGUFWriter, tok: Tokenizer, folder: Path, vocab_size: int) -> None:
    data = json.loads(tok.tok.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedError(f"tokenizer model {model.get('type')!r}: GGUF export writes byte-level BPE only",
                               folder)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(data.get("pre_tokenizer"), folder))
    by_id = {i: t for t, i in tok.tok.get_vocab(with_added_tokens=True).items()}
    added = {a["id"]: a.get("special", False) for a in data.get("added_tokens", [])}
    n = max(vocab_size, len(by_id))
    tokens, types = [], []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added.get(i) else
                         TokenType.USER_DEFINED if i in added else TokenType.NORMAL)
        else:  # the model's vocabulary is larger than the tokenizer's, as convert_hf_to_gguf pads it
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    eos = tok.tok.token_to_id(tok.special["eos_token"]) if "eos_token" in tok.special else None
    ends = [e for e in (eos, *tok.eos_ids) if e is not None]
    if ends:
        w.add_eos_token_id(ends[0])
        others = [e for e in ends if e != ends[0]]
        if others:
            w.add_eot_token_id(others[0])
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    pad = tok.special.get("pad_token")
    if pad is not None and tok.tok.token_to_id(pad) is not None:
        w.add_pad_token_id(tok.tok.token_to_id(pad))
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _pre_name(pre: dict | None, folder: Path) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json pre_tokenizer."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in PRE_BY_REGEX:
        return PRE_BY_REGEX[splits[0]]
    if not splits and any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return "gpt-2"
    raise UnsupportedError(f"pre-tokenizer {pre} has no llama.cpp equivalent moed knows", folder)


# --- K-quants: numpy ports of ggml's quantize_row_q{4,5,6}_K_ref (gguf-py has no quantizer for them).
# Bit-exact with libggml (tests/integration/test_gguf.py checks it): same float32 operations in the same
# order, sums taken left to right, ggml's nearest_int is round-half-to-even.

F = np.float32


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 left to right in float32, as ggml's C loops do (numpy's own sum is pairwise)."""
    s = a[0].copy()
    for row in a[1:]:
        s += row
    return s


def _rint(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants over columns: x, w [n, M] -> (scale [M], min [M] (positive), L [n, M])."""
    mn = np.minimum(x.min(axis=0), F(0))
    mx = x.max(axis=0)
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    flat = mx == mn
    rng = np.where(flat, F(1), mx - mn)
    iscale = F(nmax) / rng
    scale = F(1) / iscale
    L = np.clip(_rint(iscale * (x - mn)), 0, nmax)
    diff = scale * L.astype(F) + mn - x
    best = _seqsum(w * (diff * diff))
    for step in range(nstep + 1):  # ggml updates `min` inside this loop; the next steps use the new one
        cur = mx - mn
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / np.where(cur == 0, F(1), cur)
        la = np.clip(_rint(iscale * (x - mn)), 0, nmax)
        lf = la.astype(F)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, F(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        this_min = np.where(pos, F(0), this_min)
        diff = this_scale * lf + this_min - x
        err = _seqsum(w * (diff * diff))
        better = ok & (err < best)
        L = np.where(better, la, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    return np.where(flat, F(0), scale), -mn, np.where(flat, 0, L)


def _k_search(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Q4_K/Q5_K: 8 sub-blocks of 32 per 256; returns x [32, 8, N], 6-bit scales/mins, d, dmin, levels."""
    n = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(n, 8, 32).transpose(2, 1, 0))  # [32, 8, N]
    xs = x.reshape(32, -1)
    w = np.sqrt(_seqsum(xs * xs) / F(32)) + np.abs(xs)
    scales, mins, L = _make_qkx2(xs, w, nmax, rmin, rdelta, nstep)
    scales, mins, L = scales.reshape(8, n), mins.reshape(8, n), L.reshape(32, 8, n)
    max_scale, max_min = np.maximum(scales.max(axis=0), F(0)), np.maximum(mins.max(axis=0), F(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
        inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
    ls = np.minimum(_rint(inv_scale * scales) & 0xFF, 63).astype(np.uint8)  # [8, N]
    lm = np.minimum(_rint(inv_min * mins) & 0xFF, 63).astype(np.uint8)
    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, 0:4] = (ls[:4] | ((ls[4:] >> 4) << 6)).T
    packed[:, 4:8] = (lm[:4] | ((lm[4:] >> 4) << 6)).T
    packed[:, 8:12] = ((ls[4:] & 0xF) | ((lm[4:] & 0xF) << 4)).T
    d16, dmin16 = (max_scale / F(63)).astype(np.float16), (max_min / F(63)).astype(np.float16)
    d = d16.astype(F) * ls.astype(F)
    dm = dmin16.astype(F) * lm.astype(F)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_rint((x + dm) / np.where(nz, d, F(1))), 0, nmax)
    q = np.where(nz, q, L).astype(np.uint8).transpose(2, 1, 0)  # [N, 8, 32]; d == 0 keeps the search's levels
    head = np.concatenate([d16.view(np.uint8).reshape(n, 2), dmin16.view(np.uint8).reshape(n, 2), packed], axis=1)
    return head, q


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_K_ref: blocks [N, 256] float32 -> [N, 144] bytes."""
    head, q = _k_search(blocks, 15, -1.0, 0.1, 20)
    return np.concatenate([head, (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(len(q), 128)], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q5_K_ref: blocks [N, 256] float32 -> [N, 176] bytes."""
    head, q = _k_search(blocks, 31, -0.5, 0.1, 15)
    lo, hi = q & 0xF, q >> 4
    qh = np.zeros((len(q), 32), dtype=np.uint8)
    for k in range(8):
        qh |= hi[:, k] << k
    return np.concatenate([head, qh, (lo[:, 0::2] | (lo[:, 1::2] << 4)).reshape(len(q), 128)], axis=1)


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(rmse_type=1) over columns: x [n, M] -> (scale [M], levels [n, M] in 0..2*nmax-1)."""
    ax = np.abs(x)
    cols = np.arange(x.shape[1])
    imax = ax.argmax(axis=0)
    mx, zero = x[imax, cols], ax[imax, cols] < F(1e-15)
    mx = np.where(zero, F(1), mx)
    w = x * x
    wx = w * x

    def trial(iscale: np.ndarray):
        ll = np.clip(_rint(iscale * x), -nmax, nmax - 1)
        lf = ll.astype(F)
        return ll, _seqsum(wx * lf), _seqsum((w * lf) * lf)

    L, sumlx, suml2 = trial(F(-nmax) / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        ll, slx, sl2 = trial(-(F(nmax) + F(0.1) * F(step)) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = slx / sl2
        L, scale, best = np.where(better, ll, L), np.where(better, s, scale), np.where(better, s * slx, best)
    return np.where(zero, F(0), scale), np.where(zero, 0, L + nmax)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q6_K_ref: blocks [N, 256] float32 -> [N, 210] bytes."""
    n = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(n, 16, 16).transpose(2, 1, 0))  # [16, 16, N]
    scales, L = _make_qx(x.reshape(16, -1), 32)
    scales, L = scales.reshape(16, n), L.reshape(16, 16, n)
    cols = np.arange(n)
    imax = np.abs(scales).argmax(axis=0)
    max_scale = scales[imax, cols]
    zero = np.abs(max_scale) < F(1e-15)
    iscale = F(-128) / np.where(zero, F(1), max_scale)
    d16 = np.where(zero, F(0), F(1) / iscale).astype(np.float16)
    sc = np.where(zero, 0, np.minimum(_rint(iscale * scales), 127)).astype(np.int8)  # [16, N]
    d = d16.astype(F) * sc.astype(F)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_rint(x / np.where(nz, d, F(1))), -32, 31) + 32
    q = np.where(nz, q, L).astype(np.uint8).transpose(2, 1, 0).reshape(n, 256)
    q[zero] = 0
    ql, qh = np.empty((n, 128), dtype=np.uint8), np.empty((n, 64), dtype=np.uint8)
    for h in range(2):
        b = q[:, 128 * h:128 * (h + 1)].reshape(n, 4, 32)
        ql[:, 64 * h:64 * h + 32] = (b[:, 0] & 0xF) | ((b[:, 2] & 0xF) << 4)
        ql[:, 64 * h + 32:64 * h + 64] = (b[:, 1] & 0xF) | ((b[:, 3] & 0xF) << 4)
        qh[:, 32 * h:32 * h + 32] = ((b[:, 0] >> 4) | ((b[:, 1] >> 4) << 2)
                                     | ((b[:, 2] >> 4) << 4) | ((b[:, 3] >> 4) << 6))
    return np.concatenate([ql, qh, sc.T.copy().view(np.uint8), d16.view(np.uint8).reshape(n, 2)], axis=1)


K_QUANTIZERS: dict[T, Callable[[np.ndarray], np.ndarray]] = {
    T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k}
