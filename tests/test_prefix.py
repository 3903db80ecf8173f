"""Shared-prefix scoring (rmserve/prefix.py) gives the scores of scoring every sample whole.

The oracle is the same engine with share_prefix=False (itself checked against transformers in
test_exact.py), plus transformers directly on a few samples. Samples are built at the token
level so that every awkward case is present: prefixes ending mid-turn, the gating token in the
shared prompt or in a member's own tokens (and exactly at the boundary: the last prefix token, the
first own token), groups of one, a suffix of one token, identical samples, and grouped samples
mixed with ungrouped ones, under token budgets that split groups.
"""
import random

import pytest
import torch

from rmserve import Engine
from rmserve.inputs import Encoded
from rmserve.prefix import (KEY_BUDGET_FACTOR, Group, computed_tokens, find_groups, fit_budget, plan, plan_call,
                            shared_length)

from .helpers import FAMILIES, random_conversation, random_text
from .reference import Reference

# fp32 on CPU: the shared and plain paths add the same terms in a different order (a prefix
# row's attention and matmuls run in a different batch); 1e-5 relative is the spec's bar,
# atol 1e-5 for outputs near zero.
RTOL, ATOL = 1e-5, 1e-5


def random_tail(rng: random.Random, n: int) -> list[int]:
    """n ordinary byte tokens (ids below 256 are the tiny tokenizer's byte alphabet, never special)."""
    return [rng.randrange(256) for _ in range(n)]


def make_samples(engine: Engine, rng: random.Random) -> tuple[list[list[int]], list]:
    """Token-id samples and one group key each (None: ungrouped)."""
    gated = engine.model.head.needs_gate
    samples: list[list[int]] = []
    keys: list = []
    boundary: list[tuple[list[int], tuple]] = []   # in this order, after the shuffled samples

    def add(ids, key):
        samples.append(list(ids))
        keys.append(key)

    bases = [e for e in engine.encode([random_conversation(rng, max_turns=2, hi=12) for _ in range(5)])]
    assert all(isinstance(e, Encoded) for e in bases)
    for b, base in enumerate(bases):
        s, g = list(base.ids), base.gate
        # answers to one prompt, rendered by the chat template (best-of-N; may share past the header)
        prompt = random_conversation(rng, max_turns=2, hi=12)[:-1]
        answers = [prompt + [{"role": "assistant", "content": random_text(rng, 1, 8)}]
                   for _ in range(rng.randint(2, 4))]
        for enc in engine.encode(answers):
            add(enc.ids, ("answers", b))
        # token-level variants cut mid-turn (after the gating pattern when the head gates)
        lo = g + 6 if gated else 2
        for _ in range(rng.randint(1, 3)):
            k = rng.randint(lo, len(s) - 1)
            add(s[:k] + random_tail(rng, rng.randint(1, 15)), ("cut", b))
        add(s, ("cut", b))
        # a suffix of one token: the sample with two other last tokens (not s itself: the engine
        # scores a sample repeated in another group once, there)
        for last in rng.sample([x for x in range(256) if x != s[-1]], 2):
            add(s[:-1] + [last], ("one", b))
        # identical samples: each must keep one token of its own
        for _ in range(3):
            add(s, ("same", b))
        # the gating token in each member's own tokens: cut before it, tails that carry a pattern
        if gated:
            other = list(bases[(b + 1) % len(bases)].ids)
            og = bases[(b + 1) % len(bases)].gate
            k = rng.randint(2, g)
            for _ in range(2):
                j = rng.randint(1, og)
                add(s[:k] + other[j:j + og - j + 5 + rng.randint(1, 10)], ("gate-in-suffix", b))
        # the gating token at the prefix boundary, on purpose: two members whose pattern starts at
        # their first own token, or at the last prefix token, beside one that differs right there.
        # That one comes first in its group (kept out of the shuffle below): the prefix segment is
        # then followed by its own tokens, so a gate read one row too far lands on another token.
        # (Every sample distinct: the engine scores a repeated sample once.)
        if gated:
            t = rng.choice([x for x in range(256) if x not in (s[g], s[g + 1])])
            for key, cut in (("gate-first-own", g), ("gate-last-prefix", g + 1)):
                boundary.append((s[:cut] + [t] + s[g:], (key, b)))
                boundary.extend((s[:-1] + random_tail(rng, 3), (key, b)) for _ in range(2))
        # a group of one and an ungrouped sample
        add(s[: rng.randint(lo, len(s))], ("alone", b))
        add(list(bases[b].ids), None)
    order = list(range(len(samples)))
    rng.shuffle(order)
    return ([samples[i] for i in order] + [list(ids) for ids, _ in boundary],
            [keys[i] for i in order] + [key for _, key in boundary])


def assert_results_close(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.ok and b.ok, (a.error, b.error)
        assert a.num_tokens == b.num_tokens
        for key, value in b.to_dict().items():
            if key in ("error", "num_tokens", "names"):
                continue
            torch.testing.assert_close(torch.tensor(getattr(a, key)), torch.tensor(value), rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{what} sample {i} {key}: {m}")


def engines(path, **settings):
    plain = Engine.from_pretrained(path, dtype="float32", device="cpu", share_prefix=False, **settings)
    shared = Engine.from_pretrained(path, dtype="float32", device="cpu", share_prefix=True, **settings)
    return plain, shared


@pytest.mark.parametrize("family", FAMILIES)
def test_sharing_equals_plain(tiny_model, family, rng):
    # A budget that splits the larger groups into chunks and leaves some whole.
    plain, shared = engines(tiny_model(family), max_batch_tokens=600)
    samples, keys = make_samples(plain, rng)
    encoded = plain.encode(samples)
    assert all(isinstance(e, Encoded) for e in encoded)
    want = plain.score(samples)
    distinct = sorted({e: i for i, e in reversed(list(enumerate(encoded)))}.values())   # what the engine runs
    encoded = [encoded[i] for i in distinct]
    for hints in (keys, None):
        cfg = shared.config
        batches = plan_call(encoded, hints and [hints[i] for i in distinct], min_shared=cfg.share_min_tokens,
                            max_tokens=cfg.max_batch_tokens, max_seqs=cfg.max_batch_seqs)
        lengths = [len(e) for e in encoded]
        # the test must exercise sharing: some groups share, fewer tokens run than without
        assert any(g.prefix > 0 for b in batches for g in b)
        assert computed_tokens(batches, lengths) < sum(lengths)
        if hints is keys:   # and the boundary layouts: a suffix of one token; the gate at either side
            in_groups = [(g.prefix, m) for b in batches for g in b if g.prefix for m in g.members]
            assert any(lengths[m] == p + 1 for p, m in in_groups)
            if plain.model.head.needs_gate:
                gates = {encoded[m].gate - p for p, m in in_groups}
                assert {-1, 0} <= gates, gates
        got = shared.score(samples, groups=hints)
        assert_results_close(got, want, f"{family} hints={'yes' if hints else 'auto'}")


@pytest.mark.parametrize("family", ["armorm", "urm"])
def test_sharing_matches_transformers(tiny_model, family, rng):
    path = tiny_model(family)
    engine = Engine.from_pretrained(path, dtype="float32", device="cpu")
    assert engine.config.share_prefix   # on by default
    ref = Reference(path)
    prompt = random_conversation(rng, max_turns=2)[:-1]
    prompt[-1]["content"] += " " + random_text(rng, 16, 20)   # at least share_min_tokens shared tokens
    convs = [prompt + [{"role": "assistant", "content": random_text(rng)}] for _ in range(3)]
    encoded = engine.encode(convs)
    assert find_groups([e.ids for e in encoded])[0].prefix > 0
    for enc, res in zip(encoded, engine.score(convs)):
        want = ref.outputs(list(enc.ids), enc.gate)
        for key, value in want.items():
            got = torch.tensor(getattr(res, key), dtype=torch.float32)
            torch.testing.assert_close(got, value.float().reshape(got.shape), rtol=RTOL, atol=ATOL)


def test_gating_input_read_from_the_prefix(tiny_model, rng):
    """Best-of-N on a gating model: one prefix, every member's gate row inside it."""
    from rmserve.prefix import pack_shared

    engine = Engine.from_pretrained(tiny_model("qrm"), dtype="float32", device="cpu")
    prompt = random_conversation(rng, max_turns=2)[:-1]
    encoded = engine.encode([prompt + [{"role": "assistant", "content": random_text(rng)}] for _ in range(4)])
    seqs, gates = [e.ids for e in encoded], [e.gate for e in encoded]
    (group,) = find_groups(seqs)
    assert group.prefix > max(gates)
    batch = pack_shared(seqs, gates, [group])
    assert batch.gate_idx.tolist() == gates   # the prefix is the batch's first segment
    assert batch.num_tokens == group.cost([len(s) for s in seqs])
    results = engine.score([list(s) for s in seqs])
    assert len({tuple(r.gating) for r in results}) == 1   # one gating input, one gating output


def test_cut_leaves_every_member_a_token():
    a = [1, 2, 3, 4, 5]
    assert shared_length([a, a, a], [0, 1, 2]) == 4
    assert shared_length([a, a[:3]], [0, 1]) == 2
    assert shared_length([a, [1, 2, 9]], [0, 1]) == 2
    assert shared_length([[7], [7]], [0, 1]) == 0
    assert find_groups([a, a, [1, 2, 9], [8, 8]], min_shared=3) == [Group((0, 1), 4), Group((2,)), Group((3,))]
    # sharing 2 tokens three ways saves as much as 4 tokens two ways: the larger group is kept
    assert find_groups([a, a, [1, 2, 9], [8, 8]], min_shared=2) == [Group((0, 1, 2), 2), Group((3,))]
    # a common lead shorter than min_shared does not share
    assert find_groups([a, a], min_shared=5) == [Group((0,)), Group((1,))]


def test_detection_prefers_the_deeper_split():
    """Two prompts with a short common lead: two groups sharing each prompt, not one sharing the lead."""
    lead = list(range(100, 120))
    p, q = lead + [1] * 50, lead + [2] * 50
    seqs = [p + [3], q + [4], p + [5], q + [6], p + [7]]
    assert find_groups(seqs, min_shared=8) == [Group((0, 2, 4), 70), Group((1, 3), 70)]
    # the same with hints, and a hint that names a group of one
    assert find_groups(seqs, ["p", "q", "p", "q", "r"], min_shared=8) == [
        Group((0, 2), 70), Group((1, 3), 70), Group((4,))]


def test_hint_errors():
    with pytest.raises(ValueError, match="one key per sample"):
        find_groups([[1, 2], [1, 3]], ["a"])
    with pytest.raises(TypeError, match="hashable"):
        find_groups([[1, 2], [1, 3]], [["a"], ["a"]])


def test_engine_rejects_wrong_number_of_groups(tiny_model):
    engine = Engine.from_pretrained(tiny_model("bt"), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="one key per sample"):
        engine.score([[1, 2, 3], [1, 2, 4]], groups=["a"])


@pytest.mark.parametrize("seed", range(40))
def test_plan_keeps_every_row_once(seed):
    """Random groups under tight budgets: every sample in exactly one batch, limits respected."""
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    seqs = []
    for _ in range(n):
        if seqs and rng.random() < 0.6:
            base = rng.choice(seqs)
            k = rng.randint(0, len(base))
            seqs.append(base[:k] + [rng.randrange(50) for _ in range(rng.randint(0 if k else 1, 40))])
        else:
            seqs.append([rng.randrange(50) for _ in range(rng.randint(1, 120))])
    lengths = [len(s) for s in seqs]
    max_tokens = rng.randint(20, 400)
    max_seqs = rng.choice([None, 1, 2, 5])
    hints = [rng.choice([None, "a", "b", "c"]) for _ in seqs] if rng.random() < 0.5 else None
    groups = fit_budget(find_groups(seqs, hints, min_shared=rng.randint(1, 10)), lengths, max_tokens, max_seqs)
    batches = plan(groups, lengths, max_tokens, max_seqs)
    rows = sorted(m for b in batches for g in b for m in g.members)
    assert rows == list(range(n))
    for b in batches:
        for g in b:
            assert g.prefix == 0 or (len(g.members) > 1 and g.prefix <= shared_length(seqs, g.members))
            assert all(lengths[m] > g.prefix for m in g.members)
        if len(b) > 1:   # a batch over a limit holds a single group
            assert sum(g.cost(lengths) for g in b) <= max_tokens
            assert sum(g.keys(lengths) for g in b) <= KEY_BUDGET_FACTOR * max_tokens
        if max_seqs is not None:
            assert sum(len(g.members) for g in b) <= max_seqs


@pytest.mark.parametrize("seed", range(10))
def test_plan_without_sharing_is_the_plain_plan(seed):
    """When nothing shares, the batches are exactly packing.plan_batches' (the plain path unchanged)."""
    from rmserve.packing import plan_batches

    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
    max_tokens, max_seqs = rng.randint(50, 1000), rng.choice([None, 1, 3, 8])
    groups = [Group((i,)) for i in range(len(lengths))]
    got = [[m for g in b for m in g.members] for b in plan(groups, lengths, max_tokens, max_seqs)]
    assert got == plan_batches(lengths, max_tokens, max_seqs)


def test_sharing_with_triton_kernels(tiny_model, rng):
    """The kernel path (RoPE from positions inside a Triton kernel; interpreter on CPU) shares exactly too."""
    plain = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu", kernels="triton",
                                   share_prefix=False)
    # share_min_tokens=4: a random prompt can be shorter than the default 16 shared tokens
    shared = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu", kernels="triton",
                                    share_min_tokens=4)
    # short texts: every token runs through the interpreter, program by program
    prompt = random_conversation(rng, max_turns=1, hi=6)[:-1]
    convs = [prompt + [{"role": "assistant", "content": random_text(rng, 1, 6)}] for _ in range(3)]
    convs.append(random_conversation(rng, max_turns=1, hi=6))
    assert find_groups([e.ids for e in shared.encode(convs)], min_shared=4)[0].prefix > 0
    assert_results_close(shared.score(convs), plain.score(convs), "triton kernels")


@pytest.mark.parametrize("share", [True, False])
def test_identical_samples_run_once_and_score_equal(tiny_model, rng, share):
    """Repeats of a sample in one call (a tied pair, a duplicated answer) run once and get equal,
    separate results, whatever their groups; two rows of one GEMM can differ in the last bit, so
    without this a tie's margin could be 6e-8."""
    engine = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu", share_prefix=share,
                                    max_batch_tokens=300)
    convs = [random_conversation(rng, max_turns=2, hi=12) for _ in range(6)]
    calls = [convs[0], convs[1], convs[0], convs[2], convs[3], convs[0], convs[4], convs[1], convs[5]]
    keys = ["a", "a", "a", "b", None, "c", "b", "d", None]
    rows = []   # samples through the model (plain and shared batches both run ModelForward.eager on CPU)
    eager = engine.model_forward.eager
    engine.model_forward.eager = lambda batch: (rows.append(batch.last_idx.numel()), eager(batch))[1]
    res = engine.score(calls, groups=keys)
    assert sum(rows) == 6                                   # 6 distinct samples computed
    for a, b in [(0, 2), (0, 5), (1, 7)]:
        assert res[a] == res[b] and res[a].gating is not res[b].gating
    alone = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu", share_prefix=False)
    for r, w in zip(res, alone.score(calls)):
        assert r.score == pytest.approx(w.score, rel=1e-5, abs=1e-5)


def test_a_group_is_split_to_the_key_budget():
    """One long prompt with many short answers fits the token budget as one group but gathers its
    prompt once per answer: 1000 + 15 x 1100 = 17,500 key rows for 2,500 computed tokens. The memory
    plan (memory.py) and the graphs' key side (cuda_graphs.KEY_FACTOR) assume at most
    KEY_BUDGET_FACTOR x max_tokens key rows a batch, so the group is split into chunks that keep it
    (each recomputing the prompt), as it is for the token budget."""
    prompt = list(range(1, 1001))
    seqs = [prompt + [2000 + i] * 100 for i in range(15)]
    lengths = [len(s) for s in seqs]
    encoded = [Encoded(tuple(s)) for s in seqs]
    max_tokens = 2500
    batches = plan_call(encoded, None, min_shared=16, max_tokens=max_tokens, max_seqs=None)
    assert sorted(m for b in batches for g in b for m in g.members) == list(range(15))
    assert all(g.prefix == 1000 for b in batches for g in b)        # still shared, in chunks
    for b in batches:
        assert sum(g.keys(lengths) for g in b) <= KEY_BUDGET_FACTOR * max_tokens
        assert sum(g.cost(lengths) for g in b) <= max_tokens


def test_batches_stay_within_attention_launch_limit(tiny_model):
    """FlashAttention's varlen launch has one grid row per sequence and CUDA stops at 65,535: however
    large the token budget, the engine plans at most MAX_BATCH_SEQS samples a batch (a shared batch
    hands attention up to two sequences a sample). 33,000 distinct two-token samples, budget 100,000."""
    from rmserve.model.attention import MAX_BATCH_SEQS
    from rmserve.prefix import plan_samples

    engine = Engine.from_pretrained(tiny_model("bt"), dtype="float32", device="cpu", max_batch_tokens=100_000)
    assert 2 * MAX_BATCH_SEQS <= 65_535
    samples = [(i, Encoded((1 + i % 200, 1 + i // 200))) for i in range(33_000)]
    planned = plan_samples(samples, None, engine.limits())
    assert sorted(k for p in planned for owners in p.owners for k in owners) == list(range(33_000))
    assert max(len(p.samples) for p in planned) <= MAX_BATCH_SEQS
