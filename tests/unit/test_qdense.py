"""Dense weights at 8 bits (daemon.models.qdense): which layers are replaced, what they compute, and a
trained model's predictions under them."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from daemon.config import load_config
from daemon.errors import MoedError
from daemon.loaders.build import load_model
from daemon.models.attention import AttnInputs, causal_mask
from daemon.models.moe import Router
from daemon.models.qdense import QuantEmbedding, QuantLinear, group_for, quantize_dense, quantize_rows
from quant.groups import quantize
from quant.kernels import available_backends, fast_cpu_backend

# relative error of one 8-bit linear layer against float32 on random weights: reference = the quantisation
# alone (~1/255 of a group's range); torch adds bfloat16 activations, onnxruntime int8 activations
LINEAR_TOL = {"reference": 6e-3, "torch": 1.5e-2, "onnxruntime": 3e-2, "native": 3e-2}
LINEAR_TOL4 = 0.08  # at 4 bits, any kernel: the quantisation's (~1/15 of a group's range; 0.066 measured) dominates
HELDOUT = Path(__file__).resolve().parents[1] / "data" / "pydoc_heldout_sample.txt"


def test_group_is_the_largest_that_divides_a_row():
    assert [group_for(k) for k in (2048, 192, 96, 48)] == [128, 64, 32, None]


def test_quantize_rows_in_blocks_equals_quantize_at_once():
    w = torch.randn(300, 256)
    a, b = quantize_rows(w, 64, codes=128 * 256), quantize(w, 8, 64)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.minimum, b.minimum)


def test_embedding_rows_are_the_dequantised_codes():
    w = torch.randn(50, 64) * 0.1
    q = quantize(w, 8, 32)
    emb = QuantEmbedding(q)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(ids), q.dequantize()[ids])
    assert emb.nbytes == 50 * 64 + 2 * 2 * 50 * 2  # codes, fp16 scale and minimum per group
    assert float((emb(ids) - w[ids]).abs().max()) < float(q.scale.float().max())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kernel", [k for k in LINEAR_TOL if k in available_backends()])
def test_linear_layers_keep_their_outputs_within_tolerance(kernel, bits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384, bias=True), nn.Linear(384, 96, bias=False), nn.Linear(256, 8))
    x = torch.randn(5, 256)
    with torch.no_grad():
        want = [model[0](x), model[1](model[0](x)), model[2](x)]
    got = quantize_dense(model, kernel, bits=bits)
    tol = LINEAR_TOL[kernel] if bits == 8 else LINEAR_TOL4
    assert got["quantized"] == 2 and isinstance(model[0], QuantLinear) and isinstance(model[1], QuantLinear)
    assert isinstance(model[2], nn.Linear)  # 8 outputs: a gate, kept
    with torch.no_grad():
        y0 = model[0](x)
        y1 = model[1](y0)
        assert y0.shape == (5, 384) and y1.shape == (5, 96) and y0.dtype == torch.float32
        assert float((y0 - want[0]).norm() / want[0].norm()) < tol
        assert float((y1 - want[1]).norm() / want[1].norm()) < 2 * tol
        assert torch.equal(model[2](x), want[2])
        assert model[0](x[None]).shape == (1, 5, 384)  # leading dims pass through


def test_a_model_keeps_its_routers_and_norms_in_float(tiny_model):
    lm = load_model(tiny_model("qwen2_moe"), dense_bits=8)
    mods = list(lm.model.modules())
    assert not any(isinstance(m, nn.Linear) and m.out_features >= 16 for m in mods)
    assert isinstance(lm.model.model.embed_tokens, QuantEmbedding) and isinstance(lm.model.lm_head, QuantLinear)
    routers = [m for m in mods if isinstance(m, Router)]
    assert routers and all(r.weight.dtype == torch.float32 for r in routers)
    ref = load_model(tiny_model("qwen2_moe"))
    for r, q in zip((m for m in ref.model.modules() if isinstance(m, Router)), routers):
        assert torch.equal(r.weight, q.weight)


@pytest.fixture(scope="module")
def trained():
    """The default (trained) model at float32, at 8-bit and at 4-bit dense weights, and held-out token ids."""
    from daemon.cli import default_model_path
    models = {b: load_model(default_model_path(), dense_bits=b) for b in (None, 8, 4)}
    return models, torch.tensor([models[None].tokenizer.encode(HELDOUT.read_text(encoding="utf-8"))[:320]])


# measured: 0.99 top-1 agreement and 0.008 relative error of the logits at 8 bits, 0.93 and 0.049 at 4
@pytest.mark.parametrize("bits, agree_at_least, error_below", [(8, 0.98, 0.02), (4, 0.9, 0.07)])
def test_trained_model_predicts_the_same_with_dense_bits(trained, bits, agree_at_least, error_below):
    """On trained weights the dense model's top-1 agrees with float32's on held-out text."""
    models, ids = trained
    ref, lm = models[None], models[bits]
    with torch.inference_mode():
        want = ref.model(ids, ref.model.new_cache(320))[0]
        got = lm.model(ids, lm.model.new_cache(320))[0]
    agree = float((want.argmax(-1) == got.argmax(-1)).float().mean())
    rel = float((got - want).norm() / want.norm())
    assert agree >= agree_at_least and rel < error_below, (agree, rel)


def test_dense_4_bits_hold_about_half_the_8_bit_bytes(trained):
    heads = [trained[0][b].model.lm_head for b in (8, 4)]
    assert all(isinstance(h, QuantLinear) for h in heads) and 0.45 < heads[1].nbytes / heads[0].nbytes < 0.6


def test_dense_bits_setting_is_checked():
    assert load_config(None, env={}, flags={"dense_bits": "8"}).dense_bits == 8
    assert load_config(None, env={}, flags={"dense_bits": "4"}).dense_bits == 4
    with pytest.raises(MoedError, match="dense_bits must be 4 or 8"):
        load_config(None, env={}, flags={"dense_bits": 5}).validate()
    with pytest.raises(MoedError, match="dense bits must be 4 or 8"):
        load_model(HELDOUT, dense_bits=5)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantize_dense(nn.Sequential(nn.Linear(64, 32)), bits=6)


def test_generate_with_dense_bits_from_the_command_line():
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "generate", "--in-process", "--dense-bits", "8",
                        "--prompt", "The list type", "--max-tokens", "4", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["tokens"]) == 4
    r = subprocess.run([sys.executable, "-m", "daemon.cli", "generate", "--in-process", "--dense-bits", "5",
                        "--prompt", "x"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--dense-bits" in r.stderr


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])  # q/k/v with biases; OLMoE's whole-projection qk norm
def test_fused_qkv_computes_what_separate_projections_do(tiny_model, arch):
    """Groups are per row, so q, k and v fused into one matrix hold the same codes: the attention layer's
    output is the separately quantised projections' (the kernel computes each output row on its own)."""
    lm = load_model(tiny_model(arch))
    attn = lm.model.model.layers[0].self_attn
    fused, apart = (copy.deepcopy(attn) for _ in range(2))
    kernel = fast_cpu_backend()
    assert quantize_dense(fused, kernel)["quantized"] == 4 and quantize_dense(apart, kernel, fuse=False)["quantized"] == 4
    assert isinstance(fused.qkv, QuantLinear) and not hasattr(fused, "q_proj")
    assert apart.qkv is None and isinstance(apart.q_proj, QuantLinear)
    if arch == "qwen2_moe":
        assert fused.qkv.bias is not None and torch.equal(
            fused.qkv.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    x = torch.randn(1, 5, lm.args.hidden_size)
    outs = []
    for m in (fused, apart, attn):
        cache = lm.model.new_cache()
        cos, sin = lm.model.rope.tables(torch.arange(5))
        with torch.no_grad():
            outs.append(m(x, AttnInputs(cos, sin, causal_mask(5, 0, x.device), cache)))
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-6)
    assert float((outs[0] - outs[2]).norm() / outs[2].norm()) < 2 * LINEAR_TOL[kernel]  # and near float32


class Rows:
    """A matrix read a block of rows at a time (as offload.store.TensorRows), counting the reads."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w, self.shape, self.reads = w, tuple(w.shape), []

    def block(self, a: int, b: int) -> torch.Tensor:
        self.reads.append((a, b))
        return self.w[a:b].clone()


@pytest.mark.parametrize("kernel", [k for k in LINEAR_TOL if k in available_backends()])
def test_a_large_matrix_made_from_row_blocks_computes_what_the_whole_matrix_does(kernel, monkeypatch):
    """quantize_dense with `rows` reads a large weight in blocks of rows and makes each block's form in
    turn (onnxruntime: a session per block); codes are per row group, so the layer computes exactly what
    the matrix quantised whole computes."""
    import daemon.models.qdense as qd
    monkeypatch.setattr(qd, "BLOCK_CODES", 128 * 256)
    torch.manual_seed(1)
    whole, blocked = nn.Sequential(nn.Linear(256, 600, bias=True)), nn.Sequential(nn.Linear(256, 600, bias=True))
    blocked.load_state_dict(whole.state_dict())
    src = Rows(whole[0].weight.detach())
    quantize_dense(whole, kernel)
    quantize_dense(blocked, kernel, rows=lambda name: src if name == "0.weight" else None)
    assert src.reads == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 600)]
    if kernel == "onnxruntime":
        assert len(blocked[0].form.parts) == 5
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(blocked[0](x), whole[0](x))
