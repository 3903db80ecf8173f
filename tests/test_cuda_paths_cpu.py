"""CPU checks of choices the CUDA paths depend on (found in a review of the never-yet-run GPU code):
which attention backends a dtype can use, and that a second Engine on one model keeps the
stacked head matrices a first Engine's CUDA graphs read."""
import pytest
import torch

from rmserve.kernels.dispatch import TORCH_OPS, TRITON_OPS
from rmserve.loader import load_model
from rmserve.model.attention import available_backends, select_attention

CUDA = torch.device("cuda")   # a device object only: nothing here touches a GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flash_backends_are_not_offered_for_fp32(dtype):
    # FlashAttention (flash-attn and torch's varlen_attn) has fp16/bf16 kernels only.
    assert available_backends(CUDA, dtype) == ["reference"]
    assert select_attention("auto", CUDA, dtype)[0] == "reference"
    with pytest.raises(ValueError, match="not available on cuda in float"):
        select_attention("torch_varlen", CUDA, dtype)
    with pytest.raises(ValueError, match="not available"):
        select_attention("flash_attn", CUDA, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_keep_the_cuda_backends_on_offer(dtype):
    assert available_backends(CUDA, dtype) == available_backends(CUDA)


def test_cpu_offers_only_the_reference():
    assert available_backends(torch.device("cpu"), torch.bfloat16) == ["reference"]


@pytest.mark.parametrize("family", ["armorm", "urm"])
def test_second_engine_keeps_the_stacked_head_matrices(tiny_model, family):
    """Engine.__init__ calls head.use_kernels; a second Engine on the same model (bench/ does this:
    graphs on, then graphs off) used to restack the first-stage matrices into new tensors and free
    the old ones, which the first Engine's captured graphs still read."""
    head = load_model(tiny_model(family)).head
    head.use_kernels(TRITON_OPS)
    first = head.projection
    ptrs = [w.data_ptr() for _, w, *_ in first.groups]
    head.use_kernels(TORCH_OPS)
    assert head.projection is None
    head.use_kernels(TRITON_OPS)
    assert head.projection is first
    assert [w.data_ptr() for _, w, *_ in head.projection.groups] == ptrs
    for group, weight, *_ in first.groups:   # the Linear layers still read rows of the kept stack
        start = 0
        for p in group:
            assert p.linear.weight.data_ptr() == weight[start].data_ptr()
            start += p.linear.out_features


def _old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """A stand-in with the signature of torch releases whose varlen_attn has no `scale` (CPU math)."""
    from rmserve.model.attention import attention_ref

    assert is_causal and return_aux is None
    return attention_ref(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, query.shape[-1] ** -0.5)


def test_torch_varlen_adapter_without_scale(monkeypatch):
    """Such a torch applies 1/sqrt(head_dim), Llama's scale: usable then, refused for another scale."""
    import torch.nn.attention.varlen as varlen

    from rmserve.model.attention import _torch_varlen, attention_ref

    monkeypatch.setattr(varlen, "varlen_attn", _old_varlen_attn)
    fn = _torch_varlen()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, h, 16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    torch.testing.assert_close(fn(q, k, v, cu, cu, 4, 4, 16 ** -0.5),
                               attention_ref(q, k, v, cu, cu, 4, 4, 16 ** -0.5), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="takes no scale"):
        fn(q, k, v, cu, cu, 4, 4, 0.5)


def test_engines_on_one_loaded_model_must_agree_on_kernels(tiny_model):
    """The layers hold one attention function and one set of ops: a second Engine with another
    choice would silently change the first's, so it is refused; the same choice is shared."""
    from rmserve import Engine
    from rmserve.engine import EngineConfig, load_tokenizer

    path = tiny_model("bt")
    model, tok = load_model(path), load_tokenizer(path)
    first = Engine(model, tok, EngineConfig(device="cpu", kernels="torch"))
    Engine(model, tok, EngineConfig(device="cpu", kernels="torch", share_prefix=False))
    with pytest.raises(ValueError, match="already runs attention=reference, kernels=torch"):
        Engine(model, tok, EngineConfig(device="cpu", kernels="triton"))
    assert first.model.backbone.layers[0].mlp.ops.name == "torch"


def test_device_steps_run_with_the_engine_device_current(tiny_model, monkeypatch, rng):
    """cuda:N: Triton launches, CUDA graph capture and replay follow the *current* device, so every
    step that launches work (the memory plan, captures, replays, the eager forward, the batch
    pipeline, sampling) runs inside devices.on_device(engine.device). Watched here through that
    seam: each op call sees the engine's device current, and no other device is ever entered. The
    engine's device is `cpu:0` here, an object distinct from the default `cpu`, so a step that enters
    a default or hard-coded device instead of the engine's shows."""
    import contextlib
    from dataclasses import fields, replace

    from rmserve import Engine, devices, memory
    from rmserve.cuda_graphs import prepare_cuda

    from .helpers import random_conversation
    from .test_cuda_graphs import Recorder

    current, entered, seen = [], [], []

    @contextlib.contextmanager
    def watched(device):
        entered.append(device)
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(devices, "on_device", watched)
    engine = Engine.from_pretrained(tiny_model("urm"), dtype="float32", device="cpu", max_batch_tokens=512,
                                    share_min_tokens=4)
    engine.device = engine.model_forward.device = torch.device("cpu", 0)

    def check(fn):
        def run(*args, **kwargs):
            seen.append(current[-1] if current else None)
            return fn(*args, **kwargs)
        return run

    ops = replace(engine.ops, **{f.name: check(getattr(engine.ops, f.name)) for f in fields(engine.ops)
                                 if f.name != "name"})
    engine.ops = ops
    engine.model.backbone.use_kernels(ops)
    engine.model.head.use_kernels(ops)
    monkeypatch.setattr(memory, "cuda_memory_plan", check(lambda *a, **k: (512, 4096)))
    _, _, engine.graphs = prepare_cuda(engine.model_forward, engine.spec, engine.config, "torch_varlen", Recorder())
    prompt = random_conversation(rng, max_turns=1, hi=10)[:-1]
    convs = [prompt + [{"role": "assistant", "content": f"answer {i}"}] for i in range(4)]
    convs += [random_conversation(rng, max_turns=1, hi=10) for _ in range(3)]
    results = engine.score(convs, samples=3, seed=1)
    assert all(r.ok and len(r.score_samples) == 3 for r in results)
    assert all(r.ok for _, r in engine.score_stream(convs))
    assert sum(engine.graphs.replays.values()) >= 2 and seen and entered
    assert set(map(str, entered)) == {"cpu:0"} and set(map(str, seen)) == {"cpu:0"}, (set(entered), set(seen))
