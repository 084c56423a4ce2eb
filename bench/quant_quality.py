#!/usr/bin/env python3
"""Quality and I/O of bit-nested expert weights, for r in 8, 6, 4, 3, 2 and both schemes (msb, residual).

- Weight MSE of each r-bit view divided by that of direct min-max rounding at r bits (float32 params),
  on synthetic groups (normal, Laplace, Student-t3) and on real-architecture tensors: the routed
  experts of our tiny models (random-normal init, NOT trained weights) and, when the pip package
  `silero-vad` is installed, the trained LSTM and conv weights it ships (a small speech model: trained,
  but not an MoE expert).
- Logits KL(unquantised || r-bit) and top-1 agreement over teacher-forced positions of the repo corpus
  (daemon/data/tiny_corpus.txt, the only text we have; the tiny models are random, so "held-out" only
  means "not used to fit anything"), per architecture.
- Bytes on disk, bytes of one expert's r-bit prefix, and bytes read per decoded token from the experts
  file with nothing cached (measured by the store's counting reader; the tiny models and, computed
  from the layout, Qwen3-30B-A3B's expert shapes).

Writes bench/results/quant_quality.json and bench/results/quant_quality.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from daemon.models import SUPPORTED  # noqa: E402

BITS = (8, 6, 4, 3, 2)
SCHEMES = ("msb", "residual")
TIE = 0.01  # as tests/integration/test_store_convert.py
QWEN3_30B = {"hidden_size": 2048, "moe_intermediate_size": 768, "layers": 48, "top_k": 8}


def machine() -> dict:
    """What ran the benchmark."""
    from profiler.hardware import describe
    return describe()


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()) ** 2).mean())


def ratios(tensors: list[torch.Tensor], group: int) -> dict:
    """scheme -> r -> sum of view MSE / sum of min-max MSE over the tensors."""
    from quant.groups import minmax_roundtrip
    from quant.schemes import scheme
    out: dict = {s: {} for s in SCHEMES}
    base = {r: sum(mse(minmax_roundtrip(w, r, group), w) for w in tensors) for r in BITS}
    for name in SCHEMES:
        s = scheme(name)
        encs = [s.encode(w, group) for w in tensors]
        for r in BITS:
            err = sum(mse(s.view(e, r).dequantize(), w) for e, w in zip(encs, tensors))
            out[name][r] = round(err / base[r], 4)
    return out


def synthetic(seed: int = 0, rows: int = 512, cols: int = 1024) -> dict[str, torch.Tensor]:
    """Matrices whose groups are i.i.d. normal, Laplace and Student-t(3)."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g)
    laplace = torch.sign(torch.randn(rows, cols, generator=g)) * torch.empty(rows, cols).exponential_(generator=g)
    chi2 = (torch.randn(3, rows, cols, generator=g) ** 2).sum(dim=0)
    return {"normal": normal, "laplace": laplace, "student_t3": torch.randn(rows, cols, generator=g) / (chi2 / 3).sqrt()}


def silero_tensors(group: int) -> tuple[list[torch.Tensor], str] | None:
    """Trained weight tensors shipped by the silero-vad pip package, cut into rows of `group`."""
    try:
        from importlib import resources

        from safetensors.torch import load_file
        path = resources.files("silero_vad").joinpath("data/silero_vad_16k.safetensors")
        state = load_file(str(path))
    except (ImportError, FileNotFoundError, OSError):
        return None
    out, names = [], []
    for name, t in sorted(state.items()):
        if t.dim() < 2 or name.startswith("stft") or t.numel() < 4 * group:  # stft: a fixed Fourier basis
            continue
        flat = t.float().reshape(-1)
        n = flat.numel() // group * group
        out.append(flat[:n].reshape(-1, group))
        names.append(f"{name}{tuple(t.shape)}".replace(" ", ""))
    return out, ", ".join(names)


def tiny_expert_tensors(folder: Path, limit: int = 6) -> list[torch.Tensor]:
    """Some routed-expert matrices of a tiny model (gate, up, down of the first experts of each layer)."""
    from daemon.loaders.build import load_model
    lm = load_model(folder)
    out = []
    for layer in lm.model.moe_layers:
        w = lm.experts.weights(layer)
        for e in range(min(limit, w.n_experts)):
            out += [w.gate[e], w.up[e], w.down[e]]
    return out


@torch.inference_mode()
def model_quality(arch: str, src: Path, stores: dict[str, Path], positions: int) -> dict:
    """KL and top-1 agreement of each (scheme, r) against the unquantised model."""
    from daemon.loaders.build import load_model
    from daemon.tiny import corpus_text
    ref = load_model(src)
    ids = ref.tokenizer.encode(corpus_text())
    window = 320
    chunks = [ids[i:i + window] for i in range(0, min(len(ids), positions) - window + 1, window)]
    wants = [ref.model(torch.tensor([c]), ref.model.new_cache(window))[0] for c in chunks]
    out: dict = {"positions": sum(map(len, chunks))}
    for name, path in stores.items():
        out[name] = {}
        for r in BITS:
            lm = load_model(path, bits=r)
            kl = raw = tie = 0.0
            for c, want in zip(chunks, wants):
                got = lm.model(torch.tensor([c]), lm.model.new_cache(window))[0]
                lp, lq = want.log_softmax(-1), got.log_softmax(-1)
                kl += float((lp.exp() * (lp - lq)).sum())
                top2 = want.topk(2, dim=-1)
                a = got.argmax(-1)
                same = a == top2.indices[:, 0]
                raw += float(same.sum())
                tie += float((same | ((top2.values[:, 0] - top2.values[:, 1] < TIE) & (a == top2.indices[:, 1]))).sum())
            n = out["positions"]
            out[name][r] = {"kl": kl / n, "top1": raw / n, "top1_tie_aware": tie / n}
    return out


@torch.inference_mode()
def bytes_per_token(path: Path, tokens: int = 16) -> dict:
    """Bytes on disk and, per r, bytes read from experts.bin per decoded token with nothing cached."""
    from daemon.loaders.build import load_model
    out: dict = {"experts_file": (path / "experts.bin").stat().st_size,
                 "dense_file": (path / "dense.safetensors").stat().st_size,
                 "total": sum(f.stat().st_size for f in path.iterdir())}
    for r in BITS:
        lm = load_model(path, bits=r)
        p = lm.experts
        prompt = lm.tokenizer.encode("The scheduler measures the cost of every expert")
        cache = lm.model.new_cache(len(prompt) + tokens + 1)
        logits = lm.model(torch.tensor([prompt]), cache)[0, -1]
        reads = []
        for _ in range(tokens):
            p.drop()  # cold: every expert the token routes to is read from the store
            before = p.bytes_read
            logits = lm.model(torch.tensor([[int(logits.argmax())]]), cache)[0, -1]
            reads.append(p.bytes_read - before)
        layers, k = len(lm.model.moe_layers), lm.args.num_experts_per_tok
        out[r] = {"expert_prefix": p.store.layout.prefix(r), "read_per_token": sum(reads) / len(reads),
                  "expected": layers * k * p.store.layout.prefix(r)}
    return out


def qwen3_30b_bytes(group: int) -> dict:
    """Bytes of one Qwen3-30B-A3B expert's r-bit prefix and per token (48 layers x 8 experts), from the layout."""
    from offload.layout import ExpertLayout
    from quant.schemes import scheme
    d, i = QWEN3_30B["hidden_size"], QWEN3_30B["moe_intermediate_size"]
    out = {}
    for name in SCHEMES:
        lay = ExpertLayout.build(scheme(name), ((i, d), (i, d), (d, i)), group)
        out[name] = {r: {"expert_prefix": lay.prefix(r),
                         "per_token": lay.prefix(r) * QWEN3_30B["layers"] * QWEN3_30B["top_k"]} for r in BITS}
        out[name]["bf16_expert"] = 3 * d * i * 2
    return out


def markdown(res: dict) -> str:
    """The results as markdown tables."""
    L = ["# Bit-nested expert weights: quality and bytes", "",
         f"Machine: {res['machine']['cpu']}, {res['machine']['torch_threads']} threads, torch {res['machine']['torch']}. "
         f"Group size {res['group']}, scales/minimums float16. Command: `{res['command']}`.", "",
         "## Weight MSE of the r-bit view / MSE of direct min-max rounding at r bits", "",
         "Below 1: the view is better than rounding to r bits directly. ALGORITHMS.md quotes (msb, synthetic): "
         "r=6 1.00, r=4 0.89-0.92, r=3 0.78-0.81, r=2 0.57-0.59.", "",
         "| tensors | scheme | " + " | ".join(f"r={r}" for r in BITS) + " |",
         "|---|---|" + "---|" * len(BITS)]
    for label, by_scheme in res["mse_ratio"].items():
        for name in SCHEMES:
            L.append(f"| {label} | {name} | " + " | ".join(f"{by_scheme[name][r]:.3f}" for r in BITS) + " |")
    L += ["", "Tensor sets: " + "; ".join(f"**{k}**: {v}" for k, v in res["tensor_sets"].items()), "",
          "## Logits against the unquantised model (teacher-forced, repo corpus)", "",
          f"KL(p_ref || p_r) in nats per position, mean; top-1 = raw argmax agreement; tie-aware counts a "
          f"position whose reference top-two logits are within {TIE} (logit std is 1) as agreeing when the "
          "r-bit model picks either. The tiny models have random weights (see the test for why they are "
          "so sensitive).", "",
          "| arch | positions | scheme | " + " | ".join(f"r={r} KL / top-1 / tie-aware" for r in BITS) + " |",
          "|---|---|---|" + "---|" * len(BITS)]
    for arch, q in res["logits"].items():
        for name in SCHEMES:
            L.append(f"| {arch} | {q['positions']} | {name} | " + " | ".join(
                f"{q[name][r]['kl']:.1e} / {q[name][r]['top1']:.3f} / {q[name][r]['top1_tie_aware']:.3f}"
                for r in BITS) + " |")
    L += ["", "## Bytes", "", "Tiny models (measured): experts read from the store per decoded token with nothing "
          "cached, and the r-bit prefix of one expert (head + r planes, each 4 KiB-aligned).", "",
          "| arch | scheme | on disk (experts / dense) | " + " | ".join(f"r={r} prefix / per token" for r in BITS) + " |",
          "|---|---|---|" + "---|" * len(BITS)]
    for arch, by_scheme in res["bytes"].items():
        for name in SCHEMES:
            b = by_scheme[name]
            L.append(f"| {arch} | {name} | {b['experts_file'] / 1e6:.2f} MB / {b['dense_file'] / 1e6:.2f} MB | " +
                     " | ".join(f"{b[r]['expert_prefix'] / 1e3:.0f} KB / {b[r]['read_per_token'] / 1e6:.2f} MB"
                                for r in BITS) + " |")
    q = res["qwen3_30b_a3b"]
    L += ["", f"Qwen3-30B-A3B expert shapes (computed from the layout; bf16 expert = "
          f"{q['msb']['bf16_expert'] / 1e6:.2f} MB, 48 layers x top-8 per token):", "",
          "| scheme | " + " | ".join(f"r={r} prefix / per token" for r in BITS) + " |", "|---|" + "---|" * len(BITS)]
    for name in SCHEMES:
        L.append(f"| {name} | " + " | ".join(f"{q[name][r]['expert_prefix'] / 1e6:.2f} MB / "
                                            f"{q[name][r]['per_token'] / 1e9:.2f} GB" for r in BITS) + " |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=list(SUPPORTED), choices=SUPPORTED)
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--positions", type=int, default=960, help="teacher-forced positions per architecture")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = p.parse_args(argv)
    from daemon.convert import convert
    from daemon.tiny import make_tiny_model

    t0 = time.time()
    res: dict = {"machine": machine(), "group": a.group_size, "bits": list(BITS),
                 "command": "python bench/quant_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "mse_ratio": {}, "tensor_sets": {}, "logits": {}, "bytes": {}}
    for dist, w in synthetic().items():
        res["mse_ratio"][f"synthetic {dist}"] = ratios([w], a.group_size)
    res["tensor_sets"]["synthetic"] = "one 512x1024 matrix per distribution, i.i.d."
    silero = silero_tensors(a.group_size)
    if silero is not None:
        res["mse_ratio"]["trained: silero-vad"] = ratios(silero[0], a.group_size)
        res["mse_ratio_per_tensor"] = {"trained: silero-vad": {
            n: ratios([t], a.group_size) for n, t in zip(silero[1].split(", "), silero[0])}}
        res["tensor_sets"]["trained: silero-vad"] = f"silero-vad 16k model ({silero[1]}), flattened into groups"
    else:
        res["tensor_sets"]["trained: silero-vad"] = "not measured: `pip install silero-vad` to include it"
    experts: list[torch.Tensor] = []
    with tempfile.TemporaryDirectory(prefix="moed-quant-quality-") as tmp:
        for arch in a.archs:
            src = make_tiny_model(arch, Path(tmp) / arch, seed=0)
            experts += tiny_expert_tensors(src)
            stores = {s: convert(src, Path(tmp) / f"{arch}-{s}", a.group_size, s) for s in SCHEMES}
            res["logits"][arch] = model_quality(arch, src, stores, a.positions)
            res["bytes"][arch] = {s: bytes_per_token(path) for s, path in stores.items()}
            print(f"{arch}: done ({time.time() - t0:.0f} s)", file=sys.stderr)
    res["mse_ratio"]["tiny-model experts (random-normal init)"] = ratios(experts, a.group_size)
    res["tensor_sets"]["tiny-model experts (random-normal init)"] = (
        f"{len(experts)} gate/up/down matrices of {', '.join(a.archs)} (tiny configs, NOT trained)")
    res["qwen3_30b_a3b"] = qwen3_30b_bytes(a.group_size)
    res["seconds"] = round(time.time() - t0, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quant_quality.json").write_text(json.dumps(res, indent=1))
    (a.out / "quant_quality.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
