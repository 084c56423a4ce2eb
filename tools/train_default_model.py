"""Train moed's built-in default model: a small Qwen3-MoE on the Python documentation, on the CPU.

    python tools/train_default_model.py [--minutes 45] [--out daemon/data/default-model]

Steps (all on this machine, nothing downloaded but one Debian package):
1. corpus: `apt-get download python3.11-doc` (Debian main; the Python documentation sources, PSF
   License 2, see tools/default_model_corpus.md), the reStructuredText sources cleaned to plain text;
   one document in 20 (by a hash of its path) is held out and never trained on;
2. a byte-level BPE of 4096 ids trained on the training documents (daemon.tiny.train_tokenizer);
3. a Qwen3-MoE of 4 layers, 8 routed experts, top-2 with renormalised weights, trained for a fixed
   wall-clock budget with AdamW, a cosine schedule over that budget, and the Switch load-balancing
   loss (coefficient 0.01) so that every expert is used;
4. the weights saved in bfloat16 under the checkpoint names of Qwen3-MoE (transformers loads the
   folder as Qwen3MoeForCausalLM; moed loads it as any other), with the training log.

`--eval FOLDER` instead reports held-out perplexity of a saved folder, computed by moed's own
runtime (daemon.loaders.build.load_model), and of the same architecture untrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.models.norms import RMSNorm  # noqa: E402
from daemon.models.rope import Rope, apply_rope  # noqa: E402
from daemon.tiny import CHAT_TEMPLATE, REAL_CONFIGS, train_tokenizer  # noqa: E402

DEB = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
CACHE = Path.home() / ".cache" / "moed" / "corpus"
HELD_OUT_EVERY = 20
VOCAB = 4096
CONFIG = {  # Qwen3-30B-A3B's config.json fields (daemon.tiny.REAL_CONFIGS), at a size that trains on two CPU
    # cores within the hour; vocabulary and special ids come from the trained tokenizer
    **{k: v for k, v in REAL_CONFIGS["qwen3_moe"].items() if k not in ("vocab_size", "bos_token_id", "eos_token_id")},
    "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 384,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "num_experts": 8, "num_experts_per_tok": 2, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "router_aux_loss_coef": 0.01, "output_router_logits": False, "initializer_range": 0.02,
}


# ---------------------------------------------------------------------------------------- corpus
_ROLE = re.compile(r":[\w:.+-]+:`(?:([^`<]*?)\s*<[^`>]*>|~?!?([^`]*))`")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_UNDERLINE = re.compile(r"^([=\-~^\"#*+`':.])\1{2,}\s*$")


def clean_rst(text: str) -> str:
    """reStructuredText to readable text: roles and literals to their words, markup lines dropped."""
    out: list[str] = []
    skip_indented = False
    for line in text.splitlines():
        s = line.strip()
        if skip_indented:
            if s and not line[:1].isspace():
                skip_indented = False
            else:
                continue
        if _UNDERLINE.match(s) or s.startswith(("+-", "+=", "| ")):  # heading underlines, grid tables
            continue
        if s.startswith(".. "):
            # directive or comment: keep the argument of titled ones, drop index/label/option blocks
            m = re.match(r"\.\. ([\w:-]+)::\s*(.*)", s)
            if m and m.group(1) in ("function", "method", "class", "attribute", "data", "exception",
                                    "decorator", "describe", "note", "warning", "seealso",
                                    "deprecated", "code-block"):
                arg = m.group(2)
                if arg and m.group(1) not in ("code-block",):
                    out.append(arg)
                continue
            skip_indented = True
            continue
        if s.startswith(":") and re.match(r":[\w -]+:", s):  # field lists of directives
            continue
        line = _ROLE.sub(lambda m: m.group(1) or m.group(2) or "", line)
        line = _LINK.sub(r"\1", line)
        line = _EMPHASIS.sub(r"\1", _LITERAL.sub(r"\1", line))
        out.append(line.replace("\\ ", "").rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def fetch_docs(cache: Path = CACHE) -> Path:
    """The documentation sources folder, from Debian's package (downloaded once into `cache`)."""
    root = cache / DEB
    if not (root / SOURCES).is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            subprocess.run(["apt-get", "download", DEB], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob(f"{DEB}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
            (Path(tmp) / "version").write_text(deb.name)
            shutil.rmtree(root, ignore_errors=True)
            (Path(tmp) / "x").rename(root)
            (Path(tmp) / "version").rename(root / "DEB")
    return root / SOURCES


def documents(sources: Path) -> tuple[list[str], list[str]]:
    """(training, held-out) documents, split by a hash of each file's path."""
    train, held = [], []
    for f in sorted(sources.rglob("*.rst.txt")):
        rel = f.relative_to(sources).as_posix()
        if rel.startswith(("whatsnew/changelog", "license")):
            continue  # the changelog is a list of issue numbers; the licence is not prose to learn
        text = clean_rst(f.read_text(encoding="utf-8", errors="replace"))
        if len(text) < 200:
            continue
        held_out = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0
        (held if held_out else train).append(text)
    return train, held


def encode_all(tok, docs: list[str]) -> torch.Tensor:
    """One stream of ids: the documents, each followed by <|endoftext|>."""
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


# ----------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    """Qwen3 attention: GQA, per-head q/k RMSNorm before RoPE, causal."""

    def __init__(self, c: dict) -> None:
        super().__init__()
        d, h, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.h, self.kv, self.hd = h, kv, hd
        self.q_proj, self.k_proj = nn.Linear(d, h * hd, bias=False), nn.Linear(d, kv * hd, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, kv * hd, bias=False), nn.Linear(h * hd, d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(hd, c["rms_norm_eps"]), RMSNorm(hd, c["rms_norm_eps"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.h, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.h * self.hd))


class SparseMoE(nn.Module):
    """Softmax router, top-k renormalised, SwiGLU experts; returns (output, load-balancing loss)."""

    def __init__(self, c: dict) -> None:
        super().__init__()
        d, i, e = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"]
        self.e, self.k, self.norm = e, c["num_experts_per_tok"], c["norm_topk_prob"]
        self.gate = nn.Linear(d, e, bias=False)
        self.w_gate = nn.Parameter(torch.empty(e, i, d))
        self.w_up = nn.Parameter(torch.empty(e, i, d))
        self.w_down = nn.Parameter(torch.empty(e, d, i))
        self.last_load = torch.zeros(e)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n = x.shape[0]
        probs = self.gate(x).float().softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        if self.norm:
            w = w / w.sum(-1, keepdim=True)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.e)
        tokens = torch.div(order, self.k, rounding_mode="floor")
        xs, ws = x[tokens], w.reshape(-1)[order].to(x.dtype)
        ys = []
        for e, part in enumerate(xs.split(counts.tolist())):
            if part.shape[0]:
                ys.append((F.silu(part @ self.w_gate[e].T) * (part @ self.w_up[e].T)) @ self.w_down[e].T)
        y = torch.cat(ys) * ws[:, None]
        out = torch.zeros_like(x).index_add_(0, tokens, y)
        frac = counts.float() / (n * self.k)
        self.last_load = frac.detach()
        aux = self.e * (frac * probs.mean(0)).sum()
        return out.view(shape), aux


class Layer(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = SparseMoE(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        y, aux = self.mlp(self.post_attention_layernorm(x))
        return x + y, aux


class TrainModel(nn.Module):
    """Qwen3-MoE for training (same computation as daemon/models/qwen3_moe.py, batched for speed)."""

    def __init__(self, c: dict) -> None:
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.rope = Rope(c["head_dim"], c["rope_theta"], None, c["max_position_embeddings"])
        std = c["initializer_range"]
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            # residual outputs scaled down by depth (GPT-2's rule)
            s = std / math.sqrt(2 * c["num_hidden_layers"]) if name.endswith(("o_proj.weight", "w_down")) else std
            nn.init.normal_(p, 0.0, s)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope.tables(torch.arange(ids.shape[1]))
        x = self.embed_tokens(ids)
        aux = torch.zeros(())
        for layer in self.layers:
            x, a = layer(x, cos, sin)
            aux = aux + a
        return self.lm_head(self.norm(x)), aux / len(self.layers)

    def hf_state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Weights under Qwen3-MoE's checkpoint names (experts one by one)."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            p = p.detach().to(dtype).contiguous()
            m = re.match(r"layers\.(\d+)\.mlp\.w_(gate|up|down)$", name)
            if m:
                for e in range(p.shape[0]):
                    out[f"model.layers.{m[1]}.mlp.experts.{e}.{m[2]}_proj.weight"] = p[e].clone()
            else:
                out[name if name.startswith("lm_head") else f"model.{name}"] = p
        return out


# -------------------------------------------------------------------------------------- training
def lr_at(frac: float, peak: float, warm: float = 0.03, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to floor*peak, over the fraction of the time budget spent."""
    if frac < warm:
        return peak * frac / warm
    p = min(1.0, (frac - warm) / (1 - warm))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def eval_loss(model: TrainModel, ids: torch.Tensor, seq: int, max_windows: int = 64) -> float:
    """Mean next-token loss over consecutive windows of the held-out stream."""
    model.eval()
    n = min(max_windows, (len(ids) - 1) // seq)
    x = ids[: n * seq].view(n, seq)
    y = ids[1: n * seq + 1].view(n, seq)
    total = 0.0
    for i in range(0, n, 8):
        logits, _ = model(x[i:i + 8])
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + 8].flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    sources = Path(args.docs) if args.docs else fetch_docs()
    train_docs, held_docs = documents(sources)
    tok = train_tokenizer(VOCAB, (line for d in train_docs for line in d.splitlines(keepends=True)))
    train_ids, held_ids = encode_all(tok, train_docs), encode_all(tok, held_docs)
    print(f"corpus: {len(train_docs)} training documents ({len(train_ids)} tokens), "
          f"{len(held_docs)} held out ({len(held_ids)} tokens); tokenizer {time.time() - t_start:.0f} s", flush=True)

    cfg = dict(CONFIG, vocab_size=tok.get_vocab_size(), bos_token_id=None,
               eos_token_id=tok.token_to_id("<|endoftext|>"))
    model = TrainModel(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    log: list[dict] = []
    t0 = time.time()
    step = tokens = 0
    loss_ema = None
    untrained = eval_loss(model, held_ids, args.seq)
    print(f"untrained held-out loss {untrained:.3f} (ppl {math.exp(untrained):.1f})", flush=True)
    while (elapsed := time.time() - t0) < budget:
        lr = lr_at(elapsed / budget, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=g)
        x = torch.stack([train_ids[s:s + args.seq] for s in starts.tolist()])
        y = torch.stack([train_ids[s + 1:s + args.seq + 1] for s in starts.tolist()])
        logits, aux = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss = ce + cfg["router_aux_loss_coef"] * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        loss_ema = ce.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * ce.item()
        if step % args.log_every == 0:
            loads = [round(float(layer.mlp.last_load.max()) * cfg["num_experts"], 2) for layer in model.layers]
            entry = {"step": step, "tokens": tokens, "seconds": round(time.time() - t0, 1), "lr": lr,
                     "train_loss": round(loss_ema, 4), "aux": round(aux.item(), 4), "max_load_x_uniform": loads}
            if step % (args.log_every * 10) == 0:
                entry["held_out_loss"] = round(eval_loss(model, held_ids, args.seq, 16), 4)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    final = eval_loss(model, held_ids, args.seq)
    print(f"trained: {step} steps, {tokens} tokens in {time.time() - t0:.0f} s; held-out loss {final:.3f} "
          f"(ppl {math.exp(final):.1f})", flush=True)
    save(model, tok, cfg, Path(args.out), {
        "command": " ".join(sys.argv), "steps": step, "tokens": tokens, "seconds": round(time.time() - t0, 1),
        "threads": args.threads, "batch": args.batch, "seq": args.seq, "peak_lr": args.lr, "seed": args.seed,
        "train_documents": len(train_docs), "held_out_documents": len(held_docs),
        "train_tokens": len(train_ids), "held_out_tokens": len(held_ids),
        "corpus": (sources.parents[5] / "DEB").read_text() if (sources.parents[5] / "DEB").exists() else str(sources),
        "held_out_loss_untrained": round(untrained, 4), "held_out_loss": round(final, 4), "log": log,
    })


def save(model: TrainModel, tok, cfg: dict, out: Path, log: dict) -> None:
    """Write the Hugging Face folder atomically (config, generation config, weights, tokenizer, log)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    eos = cfg["eos_token_id"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [eos], "bos_token_id": None, "do_sample": False}, indent=2) + "\n")
    save_file(model.hf_state_dict(torch.bfloat16), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "add_bos_token": False, "model_max_length": cfg["max_position_embeddings"]}, indent=2) + "\n")
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.chmod(0o755)
    tmp.rename(out)


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(folder: Path, docs: Path | None, seq: int, windows: int) -> dict:
    """Held-out perplexity by moed's runtime, for the trained folder and the same model untrained."""
    from daemon.loaders.build import load_model
    from daemon.tiny import iter_random_weights, save_sharded

    sources = docs or fetch_docs()
    _, held_docs = documents(sources)
    lm = load_model(folder)
    ids = encode_all(lm.tokenizer.tok, held_docs)
    cfg = json.loads((folder / "config.json").read_text())

    def ppl(model) -> float:
        n = min(windows, (len(ids) - 1) // seq)
        total = 0.0
        for i in range(n):
            x = ids[i * seq:(i + 1) * seq]
            logits = model.forward(x[None], model.new_cache(seq))
            total += F.cross_entropy(logits[0].float(), ids[i * seq + 1:(i + 1) * seq + 1], reduction="sum").item()
        return math.exp(total / (n * seq))

    trained = ppl(lm.model)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
            shutil.copy(folder / name, Path(tmp) / name)
        save_sharded(iter_random_weights("qwen3_moe", cfg, seed=0), Path(tmp))
        untrained = ppl(load_model(Path(tmp)).model)
    return {"held_out_tokens": min(windows, (len(ids) - 1) // seq) * seq, "window": seq,
            "perplexity_trained": round(trained, 2), "perplexity_untrained": round(untrained, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "daemon/data/pydoc-moe"))
    ap.add_argument("--docs", help="a folder of *.rst.txt sources instead of the Debian package")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval", metavar="FOLDER", help="report held-out perplexity of a saved model and exit")
    ap.add_argument("--windows", type=int, default=64, help="held-out windows for --eval")
    a = ap.parse_args()
    if a.eval:
        print(json.dumps(evaluate(Path(a.eval), Path(a.docs) if a.docs else None, a.seq, a.windows), indent=1))
    else:
        train(a)


if __name__ == "__main__":
    main()
