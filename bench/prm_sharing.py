"""Process reward model best-of-N: shared problem prompts vs every solution scored whole.

    python bench/prm_sharing.py                          # CPU, small random PRM, 128 problems x 8 solutions
    python bench/prm_sharing.py --problems 500 --solutions 16 --device cuda --hidden 3584 --layers 28 ...

Data: generated math-like word problems (shopping and change, rates, fractions, linear equations:
random names, items and numbers) with N step-by-step solutions each (3-6 steps of varied wording,
some with an arithmetic slip, ending with "The answer is \\boxed{X}."), rendered as Qwen2.5-Math-PRM
reads them: the card's system prompt, the problem, the steps joined by <extra_0> (engine.score takes
the steps as the assistant's content). Solutions of one problem often begin with the same words, so a
shared prompt may run into their first step. The tokenizer is the real Qwen one
(../shared/data/qwen3-tokenizer: Qwen's vocabulary, which Qwen2.5-Math-PRM uses) with its added token
151651 named <extra_0>, as in the PRM's tokenizer, and Qwen2.5's ChatML template (rmserve/tiny_templates.py
"chatml"); the model is a random qwen2_prm checkpoint (Qwen2 backbone with q/k/v biases, the 2-output score
MLP): rewards are meaningless, the work is real.

Per mode it prints samples, steps, tokens in the samples, tokens computed (the engine's own plan,
budget splits included), the prediction N(P+R)/(P+NR) from the set's mean group size N, shared prompt P
and own tokens R, process CPU and wall seconds (median of --repeats, modes interleaved) and the
largest differences of the step rewards and scores between the modes. A JSON row goes to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from prefix_sharing import (DATA, add_run_args, build_checkpoint, commit, compare_modes,  # noqa: E402
                            prediction, timing_fields)

from rmserve import Engine  # noqa: E402
from rmserve.config import PRM_STEP_TOKEN  # noqa: E402
from rmserve.prefix import computed_tokens, plan_call  # noqa: E402
from rmserve.tiny_templates import TEMPLATES  # noqa: E402

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
STEP_TOKEN_ID = 151651   # Qwen2.5-Math-PRM's <extra_0>; <|quad_end|> in the Qwen3 tokenizer files
NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana", "Ivan", "Jia", "Kofi", "Lena", "Mateo",
         "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq")
ITEMS = ("apples", "notebooks", "pencils", "oranges", "stickers", "cupcakes", "marbles", "tickets", "candles")
OPENERS = ("", "First, ", "Let's start: ", "We begin by noting that ")
LINKS = ("", "Next, ", "Then ", "So ", "Now ")


def prm_tokenizer_dir(out: str) -> str:
    """The Qwen tokenizer files with 151651 named <extra_0> and the ChatML template of Qwen2.5-Math."""
    src = os.path.join(DATA, "qwen3-tokenizer")
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    named = [added for added in tok["added_tokens"] if added["id"] == STEP_TOKEN_ID]
    if not named:
        raise SystemExit(f"{src}: no added token {STEP_TOKEN_ID} to name {PRM_STEP_TOKEN} (this benchmark needs the "
                         "Qwen tokenizer of ../shared/data)")
    old, named[0]["content"] = named[0]["content"], PRM_STEP_TOKEN
    with open(os.path.join(src, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["added_tokens_decoder"][str(STEP_TOKEN_ID)]["content"] = PRM_STEP_TOKEN
    cfg["additional_special_tokens"] = [PRM_STEP_TOKEN if t == old else t for t in cfg["additional_special_tokens"]]
    cfg["chat_template"] = TEMPLATES["chatml"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return out


def _maybe_slip(rng: random.Random, value: int, p: float = 0.15) -> int:
    return value + rng.choice((-2, -1, 1, 3, 10)) if rng.random() < p else value


def shopping(rng):
    name, (a_item, b_item) = rng.choice(NAMES), rng.sample(ITEMS, 2)
    a, b, p, q = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 9), rng.randint(1, 9)
    bill = 10 * ((a * p + b * q) // 10 + rng.randint(1, 3))
    problem = (f"{name} buys {a} {a_item} at ${p} each and {b} {b_item} at ${q} each. {name} pays with a "
               f"${bill} bill. How much change does {name} get back?")

    def solve(r):
        x, y = _maybe_slip(r, a * p), _maybe_slip(r, b * q)
        total = _maybe_slip(r, x + y)
        return [f"The {a_item} cost {a} x ${p} = ${x}.", f"The {b_item} cost {b} x ${q} = ${y}.",
                f"Together that is ${x} + ${y} = ${total}.",
                f"The change is ${bill} - ${total} = ${bill - total}."], bill - total
    return problem, solve


def rate(rng):
    d, t, t2 = rng.randint(2, 9) * rng.randint(10, 40), rng.randint(2, 6), rng.randint(2, 12)
    d -= d % t
    problem = f"A train travels {d} km in {t} hours at a constant speed. How far does it travel in {t2} hours?"

    def solve(r):
        v = _maybe_slip(r, d // t)
        return [f"The speed is {d} km / {t} h = {v} km per hour.",
                f"In {t2} hours the train covers {v} x {t2} = {v * t2} km."], v * t2
    return problem, solve


def fraction(rng):
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    k = rng.choice((2, 3, 4, 5))
    n, m = k * rng.randint(3, 20), rng.randint(1, 15)
    problem = (f"{name} has {n} {item}. {name} gives 1/{k} of them to {other} and then buys {m} more. "
               f"How many {item} does {name} have now?")

    def solve(r):
        given = _maybe_slip(r, n // k)
        left = _maybe_slip(r, n - given)
        return [f"1/{k} of {n} is {n} / {k} = {given}.", f"After giving them away, {name} has {n} - {given} = {left}.",
                f"Buying {m} more gives {left} + {m} = {left + m}."], left + m
    return problem, solve


def equation(rng):
    x, a, b = rng.randint(-9, 15), rng.randint(2, 9), rng.randint(-20, 30)
    c = a * x + b
    problem = f"Solve for x: {a}x + {b} = {c}." if b >= 0 else f"Solve for x: {a}x - {-b} = {c}."

    def solve(r):
        rhs = _maybe_slip(r, c - b)
        return [f"Move the constant to the right-hand side: {a}x = {c} - ({b}) = {rhs}.",
                f"Divide both sides by {a}: x = {rhs} / {a}, which is {rhs / a:g}."], rhs / a
    return problem, solve


def solution(rng: random.Random, solve) -> list[str]:
    steps, answer = solve(rng)
    steps = [(rng.choice(OPENERS) if i == 0 else rng.choice(LINKS)) + s for i, s in enumerate(steps)]
    if rng.random() < 0.5:   # some solutions check their work: one more step
        steps.append("Checking the arithmetic once more, every step above holds.")
    return steps + [f"The answer is \\boxed{{{answer:g}}}."]


def workload(problems: int, solutions: int, seed: int):
    """-> (conversations, group keys, total steps): `problems` problems x `solutions` solutions each."""
    rng = random.Random(seed)
    convs, keys, steps = [], [], 0
    for i in range(problems):
        problem, solve = rng.choice((shopping, rate, fraction, equation))(rng)
        for _ in range(solutions):
            answer = solution(rng, solve)
            steps += len(answer)
            convs.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem},
                          {"role": "assistant", "content": answer}])
            keys.append(i)
    return convs, keys, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=128)
    ap.add_argument("--solutions", type=int, default=8, help="N: solutions per problem")
    ap.add_argument("--seed", type=int, default=0)
    add_run_args(ap)
    ap.add_argument("--json", default=None, help="append one JSON row here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="rmserve-prm-bench-") as tmp:
        tok_dir = prm_tokenizer_dir(os.path.join(tmp, "tokenizer"))
        path = build_checkpoint(os.path.join(tmp, "model"), "qwen2_prm", args.hidden, args.layers, args.heads,
                                args.kv_heads, args.intermediate, tok_dir)
        common = dict(dtype=args.dtype, device=args.device, max_batch_tokens=args.max_batch_tokens)
        whole = Engine.from_pretrained(path, share_prefix=False, **common)
        shared = Engine.from_pretrained(path, share_prefix=True, **common)
        assert whole.preprocessor.steps.token_id == STEP_TOKEN_ID
        device = torch.cuda.get_device_name() if whole.device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
        print(f"model: qwen2_prm, {args.layers} layers, hidden {args.hidden}, {whole.dtype}, {device}, attention "
              f"{whole.attention}, budget {args.max_batch_tokens} tokens")

        convs, keys, num_steps = workload(args.problems, args.solutions, args.seed)
        encoded = whole.encode(convs)
        assert sum(len(e.steps) for e in encoded) == num_steps
        lengths = [len(e) for e in encoded]
        total = sum(lengths)
        cfg = shared.config
        computed = computed_tokens(plan_call(encoded, keys, min_shared=cfg.share_min_tokens,
                                             max_tokens=cfg.max_batch_tokens, max_seqs=cfg.max_batch_seqs), lengths)
        pred = prediction(encoded, keys)
        runs, medians, results = compare_modes({"whole": (whole, None), "shared": (shared, keys)}, convs, args.repeats)
        assert all(r.ok for r in results["whole"] + results["shared"])
        (t_whole, c_whole), (t_shared, c_shared) = medians["whole"], medians["shared"]
        pairs = list(zip(results["whole"], results["shared"]))
        step_diff = max(abs(x - y) for a, b in pairs for x, y in zip(a.step_rewards, b.step_rewards))
        score_diff = max(abs(a.score - b.score) for a, b in pairs)
        n = args.solutions

        def pick(res, first):   # the best-of-N choice among the solutions first..first+N-1
            return max(range(first, first + n), key=lambda j: res[j].score)

        best = sum(pick(results["shared"], i) == pick(results["whole"], i) for i in range(0, len(convs), n))
        row = {
            "set": f"prm_math_{args.problems}x{args.solutions}", "problems": args.problems, "solutions": args.solutions,
            "samples": len(encoded), "steps": num_steps, "tokens": total, "computed_shared": computed,
            "computed_ratio": round(total / computed, 3),
            "N": round(pred["N"], 2), "P": round(pred["P"], 1), "R": round(pred["R"], 1),
            "predicted": round(pred["predicted"], 3), "ideal": round(pred["ideal"], 3),
            **timing_fields(runs, medians, "whole", "shared"),
            "max_abs_step_reward_diff": step_diff, "max_abs_score_diff": score_diff,
            "same_best_of_n": f"{best}/{args.problems}",
            "device": device, "dtype": str(whole.dtype), "family": "qwen2_prm",
            "model": f"{args.layers}x{args.hidden}", "commit": commit(),
        }
        print(f"\n{row['set']}: {row['samples']} samples, {num_steps} steps, {total} tokens; "
              f"N={row['N']} P={row['P']} R={row['R']}")
        print(f"  predicted N(P+R)/(P+NR) = {row['predicted']:.3f}   ideal (per group) = {row['ideal']:.3f}")
        print(f"  tokens computed: {total} whole, {computed} shared (x{row['computed_ratio']:.3f})")
        print(f"  process CPU time (median of {args.repeats}): {c_whole:.2f} s whole, {c_shared:.2f} s shared -> "
              f"x{row['speedup_cpu']:.3f}")
        print(f"  wall: {t_whole:.2f} s whole, {t_shared:.2f} s shared -> x{row['speedup_wall']:.3f}")
        print(f"  largest |step reward difference| {step_diff:.2e}, |score difference| {score_diff:.2e}; "
              f"same best-of-{args.solutions} pick in {row['same_best_of_n']} problems")
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
