"""Padding rows of the CUDA-graph ladder on the real workloads, with the engine's own planner and
ladder: a CPU computation (no model runs; the batches are planned and packed exactly as the
engine does, and each is matched to its bucket as cuda_graphs.GraphRunner would).

    python bench/padding.py                      # both workloads, table + bench/results/padding.json

Workloads (../shared/data, or $RMSERVE_DATA; Llama 3 tokenizer and template, BOS "one"):
alpaca_eval_bon (12,075 answers, 15 per instruction, file order) and hh_rlhf_harmless_test
(2,312 pairs: chosen and rejected side by side).

Modes:
- offline: `rmserve score` parts of 2,048 rows (pairs: 4,096 samples), each planned at once with
  the job's group keys (pairs) or automatic grouping (one answer per row);
- served:  batches as the async engine forms them from a queue in file order: n ~ U[1, 64]
  arrivals at a time (seeded), cut at the token budget like AsyncEngine._take, each planned
  by Engine.score_encoded (automatic grouping);
each with share_prefix on (the default) and off.

Ladders:
- before:    the ladder this replaced: power-of-two token rungs, S = 4T/L, no key side (every
             shared-prompt batch ran eagerly), up to the budget;
- 8b:        today's ladder for Llama-3.1-8B: up to cuda_graphs.graph_token_limit (6,144 tokens;
             larger batches run eagerly by design), key side when sharing;
- up-to-budget: today's ladder for a model small enough to replay up to the budget (16,384).

Per row: batches, how many replay a graph and how many run eagerly, tokens computed, padding
rows as a share of all rows computed (replayed buckets' padding; eager batches have none) and
as a share of the replayed buckets' rows, and the share of tokens that ran eagerly.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import rmbench  # noqa: E402

from rmserve import shapes  # noqa: E402
from rmserve.config import spec_from_dict  # noqa: E402
from rmserve.cuda_graphs import KEY_FACTOR, bucket_for, bucket_ladder, graph_token_limit  # noqa: E402
from rmserve.inputs import Encoded, Preprocessor  # noqa: E402
from rmserve.prefix import Limits, plan_samples  # noqa: E402

BUDGET = 16384          # EngineConfig.max_batch_tokens
MAX_LENGTH = 131072     # Llama-3.1's max_position_embeddings
PART_ROWS = 2048        # JobConfig's default --part-rows
MAX_ARRIVALS = 64       # served batches hold 1..64 samples


def read(name: str) -> list[dict]:
    with gzip.open(os.path.join(rmbench.DATA, name), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def workloads(pre: Preprocessor) -> dict[str, list[tuple[object, Encoded, int]]]:
    """name -> [(group key, encoded sample, row)] in file order (samples that cannot be scored dropped)."""
    out = {}
    rows = read("alpaca_eval_bon.jsonl.gz")
    enc = pre.encode_many([r["messages"] for r in rows])
    out["alpaca_eval_bon"] = [(r["prompt_id"], e, i) for i, (r, e) in enumerate(zip(rows, enc)) if isinstance(e, Encoded)]
    rows = read("hh_rlhf_harmless_test.jsonl.gz")
    enc = pre.encode_many([r[side] for r in rows for side in ("chosen", "rejected")])
    out["hh_rlhf_pairs"] = [(rows[i // 2]["pair_id"], e, i // 2) for i, e in enumerate(enc) if isinstance(e, Encoded)]
    return out


def offline_batches(samples, pairs: bool, limits: Limits):
    """The job's parts, each planned at once (pairs with their pair ids as group keys)."""
    parts: dict[int, list] = {}
    for key, e, row in samples:
        parts.setdefault(row // PART_ROWS, []).append((key, e))
    for part in parts.values():
        items = list(enumerate(e for _, e in part))
        yield from plan_samples(items, [k for k, _ in part] if pairs else None, limits)


def served_batches(samples, limits: Limits, seed: int):
    """The async engine's batches: n ~ U[1, 64] arrivals, cut at the token budget (AsyncEngine._take),
    each call planned with automatic grouping (Engine.score_encoded)."""
    rng = random.Random(seed)
    queue = [e for _, e, _ in samples]
    at = 0
    while at < len(queue):
        n = rng.randint(1, MAX_ARRIVALS)
        batch, tokens = [], 0
        for e in queue[at:at + n]:
            if batch and tokens + len(e) > limits.max_tokens:
                break
            batch.append(e)
            tokens += len(e)
        at += len(batch)
        yield from plan_samples(list(enumerate(batch)), None, limits)


@dataclass
class Row:
    workload: str
    mode: str
    share_prefix: bool
    ladder: str
    captures: int
    batches: int = 0
    replayed: int = 0
    eager: int = 0
    tokens: int = 0
    padding: int = 0
    replayed_rows: int = 0
    eager_tokens: int = 0

    @property
    def padding_share(self) -> float:
        """Padding rows / all rows computed."""
        return self.padding / (self.tokens + self.padding)

    @property
    def replayed_padding_share(self) -> float:
        return self.padding / self.replayed_rows if self.replayed_rows else 0.0


def ladders(share: bool) -> dict[str, list]:
    llama8b = spec_from_dict(shapes.config(shapes.BACKBONES["llama-3.1-8b"], "bt"))
    keys = KEY_FACTOR if share else 0
    return {
        "before": bucket_ladder(BUDGET, MAX_LENGTH, per_octave=1, seq_factor=4),
        "8b": bucket_ladder(min(graph_token_limit(llama8b), BUDGET), MAX_LENGTH, key_factor=keys),
        "up-to-budget": bucket_ladder(BUDGET, MAX_LENGTH, key_factor=keys),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="served arrivals")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "padding.json"))
    args = ap.parse_args()
    tok = rmbench.load_tokenizer()
    if tok is None:
        sys.exit(f"needs the Llama 3 tokenizer and both workloads under {rmbench.DATA} (or $RMSERVE_DATA)")
    pre = Preprocessor(tok, max_length=MAX_LENGTH, needs_gate=False)
    rows: list[Row] = []
    for name, samples in workloads(pre).items():
        for share in (True, False):
            limits = Limits(max_tokens=BUDGET, share=share)
            found = ladders(share)
            for mode in ("offline", "served"):
                planned = (offline_batches(samples, name == "hh_rlhf_pairs", limits) if mode == "offline"
                           else served_batches(samples, limits, args.seed))
                stats = {k: Row(name, mode, share, k, len(ladder)) for k, ladder in found.items()}
                for p in planned:
                    batch = p.pack(needs_gate=False)
                    t = batch.num_tokens
                    for key, ladder in found.items():
                        row = stats[key]
                        row.batches += 1
                        row.tokens += t
                        b = bucket_for(ladder, batch)
                        if b is None:
                            row.eager += 1
                            row.eager_tokens += t
                        else:
                            row.replayed += 1
                            row.replayed_rows += b.tokens
                            row.padding += b.tokens - t
                rows.extend(stats.values())
    print(f"budget {BUDGET} tokens; padding = padding rows / all rows computed (replayed: of the replayed "
          f"buckets' rows); eager batches compute no padding")
    print(f"{'workload':16} {'mode':8} {'share':5} {'ladder':13} {'captures':>8} {'batches':>7} {'replayed':>8} "
          f"{'eager':>5} {'tokens':>9} {'padding':>8} {'replayed':>8} {'eager tok':>9}")
    for r in rows:
        print(f"{r.workload:16} {r.mode:8} {'on' if r.share_prefix else 'off':5} {r.ladder:13} {r.captures:8d} "
              f"{r.batches:7d} {r.replayed:8d} {r.eager:5d} {r.tokens:9d} {100 * r.padding_share:7.1f}% "
              f"{100 * r.replayed_padding_share:7.1f}% {100 * r.eager_tokens / r.tokens:8.1f}%")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        env = rmbench.environment("cpu")
        out = {"environment": {k: env[k] for k in ("date", "commit", "torch")}, "budget": BUDGET,
               "rows": [dict(asdict(r), padding_share=round(r.padding_share, 4),
                             replayed_padding_share=round(r.replayed_padding_share, 4)) for r in rows]}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
