"""DeepSeek-V2 against transformers 5.23: routing, MLA variants, YaRN tables, decode steps (fp32, 1e-4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from daemon.errors import MoedError
from daemon.loaders.build import load_model
from daemon.models.deepseek_v2 import Args, GroupRouter, Model
from daemon.tiny import REAL_CONFIGS, make_tiny_model

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf  # noqa: E402

TOL = 1e-4  # max abs logit difference, fp32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("deepseek_v2", tmp_path_factory.mktemp("ds") / "tiny", seed=1)


def variant(base: Path, out: Path, seed: int = 2, **changes) -> Path:
    """The tiny model with config fields changed and fresh weights to match."""
    return make_tiny_model("deepseek_v2", out, seed=seed, config=changes)


def reference(path: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def parity(path: Path, t: int = 24) -> tuple[float, float]:
    """Max abs logit diff of a batch-of-2 prefill and of one-token decode steps against transformers."""
    ref, lm = reference(path), load_model(path).model
    x = torch.randint(0, 512, (2, t), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).logits  # [2, T, V]
        prefill = (lm(x, lm.new_cache()) - want).abs().max().item()
        cache, decode = lm.new_cache(capacity=4), 0.0  # small capacity: exercises cache growth
        for i in range(t):
            decode = max(decode, (lm(x[:, i:i + 1], cache)[:, 0] - want[:, i]).abs().max().item())
    return prefill, decode


VARIANTS = {
    "lite": {},  # q_lora_rank None, greedy, YaRN: DeepSeek-V2-Lite's shape
    "q_lora": {"q_lora_rank": 64, "attention_bias": True},  # DeepSeek-V2's low-rank queries
    "group_limited": {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                      "num_experts_per_tok": 3, "routed_scaling_factor": 2.0},
    "no_rope_scaling": {"rope_scaling": None, "first_k_dense_replace": 0},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(name: str, tiny: Path, tmp_path: Path) -> None:
    path = variant(tiny, tmp_path / name, **VARIANTS[name]) if VARIANTS[name] else tiny
    prefill, decode = parity(path)
    assert prefill <= TOL and decode <= TOL, (prefill, decode)


def hf_config(**changes) -> "transformers.DeepseekV2Config":
    return transformers.DeepseekV2Config.from_dict(REAL_CONFIGS["deepseek_v2"] | changes)


@pytest.mark.parametrize("method,n_group,topk_group,top_k,scale", [
    ("greedy", 1, 1, 6, 1.0),
    ("group_limited_greedy", 8, 3, 6, 16.0),  # DeepSeek-V2's own routing
    ("group_limited_greedy", 4, 2, 6, 1.0),
    ("group_limited_greedy", 4, 1, 2, 2.5),
])
def test_router_matches_transformers(method: str, n_group: int, topk_group: int, top_k: int, scale: float) -> None:
    cfg = {"topk_method": method, "n_group": n_group, "topk_group": topk_group, "num_experts_per_tok": top_k,
           "routed_scaling_factor": scale, "hidden_size": 64}
    g = torch.Generator().manual_seed(0)
    ref = hf.DeepseekV2TopkRouter(hf_config(**cfg))
    ref.weight.data = torch.randn(64, 64, generator=g)
    ours = GroupRouter(Args.from_config(REAL_CONFIGS["deepseek_v2"] | cfg))
    ours.weight.data = ref.weight.data.clone()
    x = torch.randn(256, 64, generator=g)
    logits, w, idx = ref(x)
    r = ours(x)
    ref_order, our_order = idx.argsort(dim=-1), r.experts.argsort(dim=-1)
    assert torch.equal(idx.gather(1, ref_order), r.experts.gather(1, our_order))
    torch.testing.assert_close(r.weights.gather(1, our_order), w.gather(1, ref_order), rtol=0, atol=1e-6)
    torch.testing.assert_close(r.logits, logits, rtol=0, atol=1e-6)
    if method == "group_limited_greedy":  # the group limit must actually change some choices
        greedy = x.float() @ ours.weight.T
        assert not torch.equal(greedy.topk(top_k, dim=-1).indices.sort(dim=-1).values,
                               r.experts.sort(dim=-1).values)


@pytest.mark.parametrize("changes", [{}, {"rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 16,
                                                           "original_max_position_embeddings": 1024,
                                                           "mscale": 1.0, "mscale_all_dim": 0.5}},
                                     {"rope_scaling": None}])
def test_yarn_tables_and_scale_match_transformers(changes: dict) -> None:
    config = hf_config(**changes)
    ref = hf.DeepseekV2RotaryEmbedding(config)
    args = Args.from_config(REAL_CONFIGS["deepseek_v2"] | changes)
    with torch.device("meta"):  # only the rope and the scale are needed, not weights
        rope = Model(args).rope
        ref_scale = hf.DeepseekV2Attention(config, 0).scaling
    pos = torch.tensor([0, 1, 7, 100, 4095, 4096, 40000, 163839])
    freqs = ref(torch.zeros(1), pos[None])[0]  # [T, d/2] complex, attention factor folded in
    cos, sin = rope.tables(pos)
    half = args.qk_rope_head_dim // 2
    torch.testing.assert_close(rope.inv_freq, ref.inv_freq, rtol=0, atol=0)
    assert rope.attention_factor == pytest.approx(ref.attention_scaling, abs=1e-12)
    torch.testing.assert_close(cos[:, :half], freqs.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, :half], freqs.imag, rtol=0, atol=1e-6)
    assert args.softmax_scale == pytest.approx(ref_scale, rel=1e-12)


def test_q_lora_rank_null_and_absent() -> None:
    cfg = REAL_CONFIGS["deepseek_v2"]
    assert Args.from_config(cfg).q_lora_rank is None  # V2-Lite writes null: full-rank q_proj
    absent = {k: v for k, v in cfg.items() if k != "q_lora_rank"}
    want = transformers.DeepseekV2Config.from_dict(absent).q_lora_rank
    assert Args.from_config(absent).q_lora_rank == want == 1536


def test_moe_layers_follow_first_k_dense_replace_and_freq() -> None:
    args = Args.from_config(REAL_CONFIGS["deepseek_v2"] | {"num_hidden_layers": 6, "hidden_size": 64,
                                                           "first_k_dense_replace": 1, "moe_layer_freq": 2})
    with torch.device("meta"):
        assert Model(args).moe_layers == [2, 4]


@pytest.mark.parametrize("changes", [{"topk_method": "noaux_tc"}, {"scoring_func": "sigmoid"},
                                     {"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1},
                                     {"mlp_bias": True}])
def test_unsupported_configs_are_clear_errors(changes: dict, tiny: Path, tmp_path: Path) -> None:
    args = Args.from_config(REAL_CONFIGS["deepseek_v2"] | changes | {"hidden_size": 64})
    with torch.device("meta"), pytest.raises(ValueError):
        Model(args)
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    cfg = json.loads((tiny / "config.json").read_text()) | changes
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoedError, match="unsupported configuration"):
        load_model(bad)
