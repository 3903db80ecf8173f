"""The `rmserve` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _score(args: argparse.Namespace) -> int:
    from .engine import Engine

    if args.model.startswith("tiny:"):
        print(f"note: {args.model} has random weights; its scores are meaningless", file=sys.stderr)
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                    max_batch_tokens=args.max_batch_tokens, bos=args.bos)
    rows, convs = [], []
    with open(args.input, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            rows.append(row.get("id", n))
            convs.append(row.get("messages"))
    errors = 0
    with open(args.output, "w", encoding="utf-8") as out:
        for rid, res in zip(rows, engine.score(convs)):
            errors += not res.ok
            out.write(json.dumps({"id": rid, **res.to_dict()}) + "\n")
    print(f"scored {len(rows) - errors} rows, {errors} errors -> {args.output}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rmserve", description="Fast, exact reward-model inference")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a jsonl file of conversations")
    s.add_argument("input")
    s.add_argument("--model", required=True, help="checkpoint directory, hub id, or tiny:<family>")
    s.add_argument("--output", required=True)
    s.add_argument("--dtype", default="auto")
    s.add_argument("--device", default=None)
    s.add_argument("--max-batch-tokens", type=int, default=16384)
    s.add_argument("--bos", default="one", choices=["one", "template", "tokenizer"])
    s.set_defaults(func=_score)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
