"""Shared-prefix planning and packing: a prompt common to several samples runs once.

A preference pair is two conversations equal up to the last answer; best-of-N is N answers to
one prompt. Here such samples form a `Group`: its `prefix` leading tokens (common to every
member) run once as a packed segment of their own, and each member's remaining tokens (its
suffix, at least one token) run as a segment whose queries attend causally to the prefix K/V
and to their own tokens, positions continuing after the prefix. Work drops from N(P+R) to
P+NR tokens; the scores are those of scoring each sample whole.

How a batch is laid out (one packed forward, no host loop per layer):

    tokens   [ prefix A | suffix A1 | suffix A2 | prefix B | suffix B1 | ... | plain sample | ... ]
    queries  one segment each (cu_seqlens)
    keys     per segment, gathered by kv_idx from the same layer's K/V:
             prefix A -> prefix A;  suffix A1 -> [prefix A ; suffix A1];  plain -> itself

The attention backends align the causal mask bottom-right when a segment has more keys than
queries, which is exactly "the suffix sees the whole prefix and its own past": the reference
backend builds that mask; flash-attn's varlen causal is bottom-right (since 2.1); PyTorch's
varlen_attn (2.10's is_causal, 2.11+/2.13's window_size=(-1, 0)) calls aten's
_flash_attention_forward, the same kernel family, whose causal is bottom-right too
(tests/gpu/test_prefix_cuda.py checks each backend against the reference).
ArmoRM/QRM gate on a token of the prompt: gate_idx points into the prefix's hidden rows, so
the gating input is computed once per prompt and read by every answer. A process reward model's
step tokens lie in the answers, so step_idx points into each member's own segment; a step token
inside the shared prefix (members whose first steps are the same text) points into the prefix's
row, whose hidden state is that of every member there (causal attention over equal tokens).

Grouping (`find_groups`): by the caller's hint (one key per sample, e.g. a prompt id or pair
id) or, without hints, automatically by sorting the samples' token ids and cutting the sorted
list where neighbours share fewer than `min_shared` tokens. Groups over the token budget (or over
KEY_BUDGET_FACTOR times it in gathered key rows, the memory plan's bound) are split into chunks
that each recompute the prefix (`fit_budget`); batches are planned over whole chunks (`plan`),
so no row is lost or duplicated.

This module plans and packs only: `plan_samples` turns one call's (or one stream window's)
samples into `PlannedBatch`es (identical samples merged into one row; with sharing off every
sample stands alone, which gives packing.plan_batches' batches), and `PlannedBatch.pack` builds
the batch; rmserve/pipeline.py runs them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from .inputs import Encoded
from .packing import PackedBatch, pack

# Gathered key rows of one batch (prefix K/V repeated for each member) are bounded by this
# multiple of the token budget; plain batches have exactly as many keys as tokens.
KEY_BUDGET_FACTOR = 4


@dataclass(frozen=True)
class Group:
    """Samples scored together. members: indices into the call's samples; prefix: leading tokens
    common to all members that run once (0: no sharing, each member runs whole)."""
    members: tuple[int, ...]
    prefix: int = 0

    def cost(self, lengths: Sequence[int]) -> int:
        """Tokens this group computes."""
        return self.prefix + sum(lengths[m] - self.prefix for m in self.members)

    def keys(self, lengths: Sequence[int]) -> int:
        """Key rows its attention reads (the prefix once for itself, then once per member)."""
        return self.prefix + sum(lengths[m] for m in self.members)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_length(seqs: Sequence[Sequence[int]], members: Sequence[int]) -> int:
    """Common leading tokens of the members, cut so that each keeps at least one token of its own."""
    first = seqs[members[0]]
    p = len(first)
    for m in members[1:]:
        p = common_prefix(first[:p], seqs[m])
    return min(p, min(len(seqs[m]) for m in members) - 1)


def _hinted(seqs, hints, min_shared: int) -> list[Group]:
    if len(hints) != len(seqs):
        raise ValueError(f"groups= needs one key per sample: {len(hints)} keys for {len(seqs)} samples")
    by_key: dict[Hashable, list[int]] = {}
    groups: list[Group] = []
    for i, key in enumerate(hints):
        if key is None:
            groups.append(Group((i,)))
            continue
        try:
            by_key.setdefault(key, []).append(i)
        except TypeError:
            raise TypeError(f"group keys must be hashable (a prompt id, say), got {type(key).__name__}") from None
    for members in by_key.values():
        groups.extend(_make_group(seqs, members, min_shared))
    return groups


def _make_group(seqs, members: Sequence[int], min_shared: int) -> list[Group]:
    if len(members) > 1:
        p = shared_length(seqs, members)
        if p >= max(min_shared, 1):
            return [Group(tuple(members), p)]
    return [Group((m,)) for m in members]


def _split_run(seqs, order: list[int], lcps: list[int], min_shared: int, depth: int = 0) -> list[Group]:
    """order: sample indices in sorted token order; lcps[j]: tokens shared by order[j] and order[j+1].

    One group over the whole run shares min(lcps) tokens; splitting where the neighbours share
    exactly that minimum may share more inside each part. Keep whichever saves more tokens."""
    if len(order) == 1:
        return [Group((order[0],))]
    whole = _make_group(seqs, order, min_shared)
    saved_whole = whole[0].prefix * (len(order) - 1) if len(whole) == 1 else 0
    low = min(lcps)
    if depth > 64 or all(v == low for v in lcps):   # nothing deeper to find (or a pathological chain)
        return whole
    parts: list[Group] = []
    start = 0
    for j, v in enumerate(lcps + [low]):
        if v == low:
            parts.extend(_split_run(seqs, order[start:j + 1], lcps[start:j], min_shared, depth + 1))
            start = j + 1
    saved_parts = sum(g.prefix * (len(g.members) - 1) for g in parts)
    return parts if saved_parts > saved_whole else whole


def _detected(seqs, min_shared: int) -> list[Group]:
    order = sorted(range(len(seqs)), key=lambda i: tuple(seqs[i]))
    groups: list[Group] = []
    start = 0
    lcps = [common_prefix(seqs[a], seqs[b]) for a, b in zip(order, order[1:])]
    for j in range(len(order)):
        if j == len(order) - 1 or lcps[j] < min_shared:   # a run of neighbours ends here
            groups.extend(_split_run(seqs, order[start:j + 1], lcps[start:j], min_shared))
            start = j + 1
    return groups


def find_groups(seqs: Sequence[Sequence[int]], hints: Sequence[Hashable | None] | None = None,
                min_shared: int = 16) -> list[Group]:
    """Every sample index in exactly one Group, groups ordered by their first member.

    hints: one group key per sample (None: the sample is on its own); without hints, samples
    are grouped by equal leading tokens. A group shares only if its members have at least
    `min_shared` leading tokens in common, after leaving each member one token of its own."""
    groups = _hinted(seqs, hints, min_shared) if hints is not None else _detected(seqs, min_shared)
    groups = [Group(tuple(sorted(g.members)), g.prefix) for g in groups]
    return sorted(groups, key=lambda g: g.members[0])


def fit_budget(groups: Sequence[Group], lengths: Sequence[int], max_tokens: int,
               max_seqs: int | None = None, max_keys: int | None = None) -> list[Group]:
    """Split groups that do not fit one batch (max_tokens computed tokens, max_seqs samples, max_keys
    key rows: KEY_BUDGET_FACTOR x max_tokens unless given) into chunks that each recompute the prefix.
    A chunk of one member does not share (it would compute the same tokens)."""
    max_keys = KEY_BUDGET_FACTOR * max_tokens if max_keys is None else max_keys
    out: list[Group] = []
    for g in groups:
        if g.prefix == 0 or (g.cost(lengths) <= max_tokens and g.keys(lengths) <= max_keys
                             and (max_seqs is None or len(g.members) <= max_seqs)):
            out.append(g)
            continue
        chunk: list[int] = []
        used = keys = g.prefix
        for m in g.members:
            own = lengths[m] - g.prefix
            full = (used + own > max_tokens or keys + lengths[m] > max_keys
                    or (max_seqs is not None and len(chunk) >= max_seqs))
            if chunk and full:
                out.append(Group(tuple(chunk), g.prefix if len(chunk) > 1 else 0))
                chunk, used, keys = [], g.prefix, g.prefix
            chunk.append(m)
            used += own
            keys += lengths[m]
        out.append(Group(tuple(chunk), g.prefix if len(chunk) > 1 else 0))
    return out


def plan(groups: Sequence[Group], lengths: Sequence[int], max_tokens: int, max_seqs: int | None = None,
         max_keys: int | None = None) -> list[list[Group]]:
    """Batches of whole groups: at most max_tokens computed tokens, max_seqs samples and max_keys
    key rows each (a group over a limit gets a batch of its own). Largest first, as
    packing.plan_batches does, which it reproduces when no group shares."""
    max_keys = KEY_BUDGET_FACTOR * max_tokens if max_keys is None else max_keys
    order = sorted(range(len(groups)), key=lambda i: -groups[i].cost(lengths))
    batches: list[list[Group]] = []
    current: list[Group] = []
    used = seqs = keys = 0
    for i in order:
        g = groups[i]
        c, n, k = g.cost(lengths), len(g.members), g.keys(lengths)
        full = used + c > max_tokens or keys + k > max_keys or (max_seqs is not None and seqs + n > max_seqs)
        if current and full:
            batches.append(current)
            current, used, seqs, keys = [], 0, 0, 0
        current.append(g)
        used, seqs, keys = used + c, seqs + n, keys + k
    if current:
        batches.append(current)
    return batches


def pack_shared(seqs: Sequence[Sequence[int]], gates: Sequence[int | None] | None, groups: Sequence[Group],
                device: torch.device | str = "cpu", steps: Sequence[Sequence[int]] | None = None) -> PackedBatch:
    """One packed batch of whole groups; rows of last_idx/gate_idx (and step_idx) follow the members in
    group order.

    seqs/gates/steps are indexed by member index (gates: None when the head has no gating token;
    steps: each member's step-token positions, None when the head reads no steps)."""
    tokens: list[int] = []
    positions: list[int] = []
    q_lens: list[int] = []
    k_ranges: list[tuple[int, int]] = []   # (flat start, length) of each key range, in key order
    k_lens: list[int] = []
    last: list[int] = []
    gate: list[int] = []
    step: list[int] = []

    def segment(ids, first_pos: int, prefix_at: int | None, prefix_len: int) -> int:
        start = len(tokens)
        tokens.extend(ids)
        positions.extend(range(first_pos, first_pos + len(ids)))
        q_lens.append(len(ids))
        if prefix_at is not None:
            k_ranges.append((prefix_at, prefix_len))
        k_ranges.append((start, len(ids)))
        k_lens.append(len(ids) + (prefix_len if prefix_at is not None else 0))
        return start

    for g in groups:
        p = g.prefix
        at = segment(seqs[g.members[0]][:p], 0, None, 0) if p else None
        for m in g.members:
            start = segment(seqs[m][p:], p, at, p)
            last.append(start + len(seqs[m]) - p - 1)
            if gates is not None:
                gp = gates[m]
                if gp is None:
                    raise ValueError("every sequence needs a gating position when gates are given")
                gate.append(at + gp if at is not None and gp < p else start + gp - p)
            if steps is not None:
                step.extend(at + s if at is not None and s < p else start + s - p for s in steps[m])

    def cumsum(lens):
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0, out=cu[1:])
        return cu

    starts = torch.tensor([s for s, _ in k_ranges], dtype=torch.int64)
    lens = torch.tensor([n for _, n in k_ranges], dtype=torch.int64)
    offsets = torch.cumsum(lens, 0) - lens
    total_k = int(lens.sum())
    kv_idx = torch.arange(total_k, dtype=torch.int64) + torch.repeat_interleave(starts - offsets, lens)
    i64 = dict(dtype=torch.int64)
    return PackedBatch(
        tokens=torch.tensor(tokens, **i64), positions=torch.tensor(positions, **i64), cu_seqlens=cumsum(q_lens),
        max_seqlen=max(q_lens), last_idx=torch.tensor(last, **i64),
        gate_idx=torch.tensor(gate, **i64) if gates is not None else None,
        step_idx=torch.tensor(step, **i64) if steps is not None else None,
        kv_idx=kv_idx, cu_seqlens_k=cumsum(k_lens), max_seqlen_k=max(k_lens),
    ).to(device)


def plan_call(encoded: Sequence[Encoded], groups: Sequence[Hashable | None] | None, *, min_shared: int,
              max_tokens: int, max_seqs: int | None) -> list[list[Group]]:
    """Grouping, budget splits and batch plan for one call's scorable samples."""
    seqs = [e.ids for e in encoded]
    lengths = [len(s) for s in seqs]
    found = find_groups(seqs, groups, min_shared)
    return plan(fit_budget(found, lengths, max_tokens, max_seqs), lengths, max_tokens, max_seqs)


@dataclass(frozen=True)
class Limits:
    """How one call's samples are planned: the batch budget and whether prompts are shared."""
    max_tokens: int
    max_seqs: int | None = None
    share: bool = True        # share_prefix
    min_shared: int = 16      # share_min_tokens


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of a plan. samples: distinct samples in row order; groups: over those rows, in
    row order (prefix 0 throughout: a plain batch); owners: per row, the caller's keys that get its
    result (a sample repeated in the call has one row and several owners)."""
    samples: tuple[Encoded, ...]
    groups: tuple[Group, ...]
    owners: tuple[tuple[Hashable, ...], ...]

    @property
    def shared(self) -> bool:
        return any(g.prefix for g in self.groups)

    def pack(self, needs_gate: bool, needs_steps: bool = False) -> PackedBatch:
        """The packed batch on the host (pack_samples)."""
        return pack_samples(self.samples, needs_gate, needs_steps, self.groups)


def pack_samples(samples: Sequence[Encoded], needs_gate: bool, needs_steps: bool = False,
                 groups: Sequence[Group] = (), device: torch.device | str = "cpu") -> PackedBatch:
    """Encoded samples -> one packed batch carrying the rows the head reads (gating positions when
    needs_gate, step positions when needs_steps): pack_shared's layout when one of `groups` (over
    the samples, in order) shares a prompt, else pack's."""
    seqs = [e.ids for e in samples]
    gates = [e.gate for e in samples] if needs_gate else None
    steps = [e.steps for e in samples] if needs_steps else None
    if any(g.prefix for g in groups):
        return pack_shared(seqs, gates, groups, device, steps)
    return pack(seqs, gates, device, steps)


def plan_samples(items: Sequence[tuple[Hashable, Encoded]], hints: Sequence[Hashable | None] | None,
                 limits: Limits) -> list[PlannedBatch]:
    """items: (key, sample) pairs, keys unique (a call's input positions); hints: one group key per
    item or None (see find_groups; ignored with sharing off). Identical samples run once: the first
    one's hint groups it, and every key gets the result (a tied pair's margin is then exactly 0,
    where two rows of one GEMM could differ in the last bit)."""
    if hints is not None and len(hints) != len(items):
        raise ValueError(f"groups= needs one key per sample: {len(hints)} keys for {len(items)} samples")
    row_of: dict[Encoded, int] = {}
    samples: list[Encoded] = []
    owners: list[list[Hashable]] = []
    first_hints: list[Hashable | None] = []
    for i, (key, e) in enumerate(items):
        j = row_of.setdefault(e, len(samples))
        if j == len(samples):
            samples.append(e)
            owners.append([])
            first_hints.append(None if hints is None else hints[i])
        owners[j].append(key)
    if not limits.share:
        first_hints = [None] * len(samples)
    elif hints is None:
        first_hints = None
    out = []
    for groups in plan_call(samples, first_hints, min_shared=limits.min_shared, max_tokens=limits.max_tokens,
                            max_seqs=limits.max_seqs):
        rows = [m for g in groups for m in g.members]
        local, at = [], 0
        for g in groups:
            local.append(Group(tuple(range(at, at + len(g.members))), g.prefix))
            at += len(g.members)
        out.append(PlannedBatch(tuple(samples[m] for m in rows), tuple(local), tuple(tuple(owners[m]) for m in rows)))
    return out


def computed_tokens(batches: Sequence[Sequence[Group]], lengths: Sequence[int]) -> int:
    """Tokens a plan runs through the backbone."""
    return sum(g.cost(lengths) for b in batches for g in b)


__all__ = ["Group", "find_groups", "fit_budget", "plan", "pack_shared", "plan_call", "Limits", "PlannedBatch",
           "plan_samples", "computed_tokens", "shared_length", "KEY_BUDGET_FACTOR"]
