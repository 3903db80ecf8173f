"""bench/profile_batch.py's timers wrap every part of the forward and change nothing it computes."""
import os
import sys
from collections import Counter

import torch

from rmserve import Engine

from .helpers import random_conversation

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import profile_batch  # noqa: E402


def test_timers_cover_every_part_and_change_nothing(tiny_model, rng):
    engine = Engine.from_pretrained(tiny_model("armorm"), dtype="float32", device="cpu")
    items = engine.encode([random_conversation(rng) for _ in range(5)])
    batch = engine.make_batch(items)
    before = engine.forward_eager(batch)
    timer = profile_batch.PartTimer(engine.device)
    profile_batch.instrument(engine, timer)
    timer.enabled = True
    after = engine.forward_eager(batch)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    layers = engine.spec.num_layers
    counts = Counter(name for name, _, _ in timer.marks)
    assert counts == {"embed": 1, "norm": 2 * layers + 1, "qkv_proj": layers, "rope": layers, "attention": layers,
                      "o_proj": layers, "gate_up_proj": layers, "silu_mul": layers, "down_proj": layers, "head": 1}
    ms = timer.take()
    assert set(ms) == set(profile_batch.PARTS) and all(v >= 0 for v in ms.values()) and timer.marks == []
    timer.enabled = False   # off: straight through, nothing recorded
    engine.forward_eager(batch)
    assert timer.marks == []


def test_part_work_counts_the_forward():
    """The parts' FLOPs add up to rmbench's per-sample count of the same forward."""
    import rmbench

    cfg = rmbench.llama_config("small", "bt")
    lengths = [5, 17, 300]
    work = profile_batch.part_work(cfg, lengths, elem_bytes=2)
    total = sum(f for f, _ in work.values())
    assert abs(total - sum(rmbench.flops_per_sample(cfg, n) for n in lengths)) < 1e-6 * total
    assert all(b > 0 for name, (_, b) in work.items() if name != "head")


def test_host_gaps_times_every_batch_of_the_stream(tiny_model, rng):
    """host_gaps wraps what score_stream calls: one mark per batch, the forward unwrapped after."""
    engine = Engine.from_pretrained(tiny_model("bt"), dtype="float32", device="cpu", max_batch_tokens=64)
    samples = [[engine.preprocessor.bos_id] + [rng.randrange(1, 200) for _ in range(40)] for _ in range(4)]
    gaps = profile_batch.host_gaps(engine, samples, "cpu")
    assert gaps["batches"] >= 2 and gaps["busy_ms"] > 0 and gaps["largest_gap_ms"] is not None
    assert "forward" not in vars(engine.model_forward)
