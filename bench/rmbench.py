"""What the throughput and latency benchmarks share: the workload, random models of a real
shape built in memory (rmserve's and transformers' sharing the same weight tensors), the FLOP
count, a measured matmul peak, and the transformers padded-batch baseline.

Workload: ../shared/data/alpaca_eval_bon.jsonl.gz rendered with the Llama 3 tokenizer and chat
template when both are there (BOS policy "one"), else a synthetic sampler with the same length
distribution (the quantiles below, measured on that file with that tokenizer).
"""
from __future__ import annotations

import datetime
import gzip
import json
import os
import random
import subprocess
import time
from dataclasses import dataclass

import torch

from rmserve import shapes
from rmserve.engine import Engine, EngineConfig
from rmserve.loader import LoadedModel

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("RMSERVE_DATA", os.path.join(HERE, "..", "..", "shared", "data"))
ALPACA = os.path.join(DATA, "alpaca_eval_bon.jsonl.gz")
TOKENIZER = os.path.join(DATA, "llama3-tokenizer")

# Token-length quantiles of alpaca_eval_bon with the Llama 3 template (mean 381, max 4079).
QUANTILES = ((0.0, 16), (0.01, 39), (0.05, 68), (0.10, 98), (0.25, 188), (0.50, 347), (0.75, 532),
             (0.90, 690), (0.95, 803), (0.99, 1065), (0.999, 1860), (1.0, 4079))
PROMPT_TOKENS = 34          # mean prompt length; synthetic ArmoRM samples gate there
PAD_ID = 128255             # a reserved Llama 3 token that no rendered sample contains

# Backbone sizes by name: the real ones from rmserve's shape table, and a small one for CPU runs.
SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "intermediate_size")
SHAPES = {
    "8b": {k: shapes.BACKBONES["llama-3.1-8b"][k] for k in SIZES},      # Llama-3.1-8B
    # the small CPU shape of issue 2
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  intermediate_size=1536),
}


def llama_config(shape: str, family: str, layers: int | None = None) -> dict:
    """A Llama-3.1 config.json (transformers 5 keys) of the given shape and head family (rmserve.shapes.HEADS)."""
    backbone = {**shapes.BACKBONES["llama-3.1-8b"], **SHAPES[shape], "pad_token_id": PAD_ID}
    return shapes.config(backbone, family, layers)


def _fill_random(name: str, t: torch.Tensor, g: torch.Generator) -> None:
    if name.endswith("reward_transform_matrix"):
        t.normal_(0.0, 0.1, generator=g).add_(torch.eye(t.shape[0], device=t.device, dtype=t.dtype))
    elif t.dim() >= 2:
        t.normal_(0, t.shape[-1] ** -0.5, generator=g)
    elif name.endswith("logit_scale"):
        t.fill_(1.0)
    elif name.endswith("weight"):        # norm scales
        t.normal_(1.0, 0.1, generator=g)
    else:                                # biases
        t.normal_(0.0, 0.1, generator=g)


def random_model(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """rmserve's backbone and head with random weights, built on `device` without a checkpoint."""
    g = torch.Generator(device=torch.device(device)).manual_seed(seed)
    return shapes.model_of_shape(cfg, device, dtype, fill=lambda name, t: _fill_random(name, t, g))


@torch.no_grad()
def hf_model(model: LoadedModel, cfg: dict):
    """transformers' LlamaForSequenceClassification (sdpa) on the same weight tensors: q/k/v and
    gate/up are row slices of rmserve's fused matrices (views, no copy). The score head is the
    BT head's weight, or a fresh one row matrix for other families (transformers has no ArmoRM class)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_keys = {k for head in shapes.HEADS.values() for k in head}
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in head_keys}, num_labels=1)
    config._attn_implementation = "sdpa"
    s, b = model.spec, model.backbone
    with torch.device("meta"):
        hf = LlamaForSequenceClassification(config)
    state = {"model.embed_tokens.weight": b.embed_tokens.weight, "model.norm.weight": b.norm.weight}
    for i, layer in enumerate(b.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.self_attn.qkv_proj.weight.split([s.q_size, s.kv_size, s.kv_size])
        gate, up = layer.mlp.gate_up_proj.weight.chunk(2)
        state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.self_attn.o_proj.weight,
                      p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
                      p + "input_layernorm.weight": layer.input_layernorm.weight,
                      p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight})
    dev, dtype = b.embed_tokens.weight.device, b.embed_tokens.weight.dtype
    if s.family == "bt":
        state["score.weight"] = model.head.score.weight
    else:
        state["score.weight"] = torch.randn(1, s.hidden_size, device=dev, dtype=dtype) * s.hidden_size ** -0.5
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(config).to(dev)
    return hf.eval()


def load_tokenizer():
    """The Llama 3 tokenizer from ../shared/data (offline), or None when it is not there."""
    if not os.path.exists(os.path.join(TOKENIZER, "tokenizer.json")):
        return None
    from transformers import PreTrainedTokenizerFast

    with open(os.path.join(TOKENIZER, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(TOKENIZER, "tokenizer.json"))
    tok.chat_template, tok.bos_token, tok.eos_token = cfg["chat_template"], cfg["bos_token"], cfg["eos_token"]
    return tok


def fallback_tokenizer():
    """The tiny tokenizer (real special-token strings and template) when the Llama 3 one is absent."""
    import tempfile

    from transformers import AutoTokenizer

    from rmserve.tiny import write_tokenizer

    path = tempfile.mkdtemp(prefix="rmbench-tok-")
    write_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def gating_pattern(tokenizer) -> tuple[int, ...]:
    """The ArmoRM/QRM gating pattern's token ids for this tokenizer (synthetic samples carry it)."""
    from rmserve.inputs import GATING_TEXT

    return tuple(tokenizer(GATING_TEXT, add_special_tokens=False)["input_ids"])


def synthetic_length(rng: random.Random) -> int:
    """Inverse-CDF sample from QUANTILES (linear between the measured quantiles)."""
    u = rng.random()
    for (p0, l0), (p1, l1) in zip(QUANTILES, QUANTILES[1:]):
        if u <= p1:
            return max(1, round(l0 + (l1 - l0) * (u - p0) / (p1 - p0)))
    return QUANTILES[-1][1]


@dataclass
class Workload:
    samples: list[list[int]]    # token ids, one list per sample (BOS first)
    source: str                 # what they are

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def workload(n: int | None, seed: int = 0, gating: tuple[int, ...] = (), data: str = ALPACA) -> Workload:
    """n samples (None: all rows) in input order, a seeded random subset of the rows when n is smaller.

    gating: the ArmoRM gating pattern's token ids; synthetic samples carry it after the prompt."""
    tok = load_tokenizer()
    rng = random.Random(seed)
    if tok is not None and os.path.exists(data):
        from rmserve.inputs import Preprocessor

        with gzip.open(data, "rt", encoding="utf-8") as f:
            rows = [json.loads(line)["messages"] for line in f]
        if n is not None and n < len(rows):
            rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
        pre = Preprocessor(tok, max_length=1 << 20, needs_gate=False)
        encoded = pre.encode_many(rows)
        return Workload([list(e.ids) for e in encoded], f"{os.path.basename(data)} ({len(rows)} rows), Llama 3 tokenizer")
    samples = []
    for _ in range(n or 12075):
        length = synthetic_length(rng)
        ids = [128000] + [rng.randrange(1000, 128000) for _ in range(length - 1)]
        if gating and length > len(gating) + 1:
            at = min(PROMPT_TOKENS, length - len(gating) - 1)
            ids[at:at + len(gating)] = gating
        samples.append(ids)
    return Workload(samples, f"synthetic lengths ({len(samples)} samples, alpaca_eval_bon quantiles)")


def make_engine(model: LoadedModel, tokenizer, **settings) -> Engine:
    return Engine(model, tokenizer, EngineConfig(**settings))


def flops_per_sample(cfg: dict, length: int) -> float:
    """Forward FLOPs of one sequence, no LM head: 2 x matmul parameters per token plus causal
    attention (QK^T and PV over L(L+1)/2 query-key pairs per head)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    attention = 2 * 2 * cfg["num_attention_heads"] * hd * length * (length + 1) / 2
    return layers * (2 * per_layer * length + attention)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int | None = None, reps: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` on `device`, measured now."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def copy_bandwidth(device: str, gib: float | None = None) -> float:
    """Bytes/s of one read plus one write, from a large device copy (1 GiB on CUDA, 256 MiB on CPU)."""
    gib = gib or (1.0 if device.startswith("cuda") else 0.25)
    n = int(gib * 2**30) // 4
    x = torch.empty(n, dtype=torch.float32, device=device).fill_(1)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


@torch.inference_mode()
def hf_score(hf, samples: list[list[int]], batch_size: int, order: str, device: str) -> tuple[list[float], int]:
    """Scores with padded batches (right padding, attention mask) in `order` ("input" or "sorted"
    by length); returns the scores in input order and the padded token count."""
    idx = list(range(len(samples)))
    if order == "sorted":
        idx.sort(key=lambda i: len(samples[i]))
    elif order != "input":
        raise ValueError(order)
    scores: list[float] = [0.0] * len(samples)
    padded = 0
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        width = max(len(samples[i]) for i in chunk)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.int64)
        mask = torch.zeros((len(chunk), width), dtype=torch.int64)
        for row, i in enumerate(chunk):
            ids[row, :len(samples[i])] = torch.tensor(samples[i])
            mask[row, :len(samples[i])] = 1
        padded += ids.numel()
        logits = hf(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, value in zip(chunk, logits[:, 0].float().cpu().tolist()):
            scores[row] = value
    return scores, padded


def rmserve_score(engine: Engine, samples: list[list[int]]) -> list[float]:
    """Scores through Engine.score_stream (the pipeline), back in input order."""
    out: list[float] = [0.0] * len(samples)
    for i, r in engine.score_stream(samples):
        if not r.ok:
            raise RuntimeError(f"sample {i}: {r.error}")
        out[i] = r.score
    return out


def environment(device: str) -> dict:
    """Device, date, commit (RMSERVE_COMMIT when set: a device machine gets the tree without .git)."""
    commit = os.environ.get("RMSERVE_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        import platform

        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    import transformers

    return {"device": name, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "torch": torch.__version__, "transformers": transformers.__version__}
