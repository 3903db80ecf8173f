"""One decoder over packed tokens for Llama, Qwen2 and Qwen3: their differences are ModelSpec fields
(config.BACKBONES), not copies of the forward, as nano-vllm's and vLLM's layers share code:

- `qkv_bias` (Qwen2): q/k/v biases, fused into `qkv_proj.bias`; o_proj has none.
- `qk_norm` (Qwen3): an RMSNorm over head_dim on each head's q and k, after the projection and
  before RoPE (`q_norm` / `k_norm` weights), fused with RoPE in one kernel (kernels/rope.py).
- `head_dim` given by the config (Qwen3: q_size = heads x head_dim need not equal hidden).

Parameter names follow Hugging Face's, under `model.`, except the two fused projections made at
load (see loader.PACKED)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelSpec
from ..packing import PackedBatch
from ..kernels.dispatch import TORCH_OPS, Ops
from ..kernels.rmsnorm import rms_norm_ref  # noqa: F401  (the HF-exact reference, re-exported)
from . import rope
from .attention import AttentionFn, attention_ref


class RMSNorm(nn.Module):
    """forward(x, residual) -> (norm(residual + x), residual + x); with residual None, (norm(x), x).
    The add is fused into the norm (kernels/rmsnorm.py); `ops` is chosen by Backbone.use_kernels."""
    ops: Ops = TORCH_OPS

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps), x
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def _linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias)
    layer.requires_grad_(False)
    return layer


class HeadNorm(nn.Module):
    """Qwen3's q_norm / k_norm: the weight [head_dim] of an RMSNorm over each head's row; the norm
    itself runs inside `qk_norm_rope` (kernels/rope.py)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(head_dim), requires_grad=False)


class Attention(nn.Module):
    ops: Ops = TORCH_OPS

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.qkv_proj = _linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=spec.qkv_bias)
        self.o_proj = _linear(spec.q_size, spec.hidden_size)
        self.scale = spec.head_dim ** -0.5
        if spec.qk_norm:
            self.q_norm, self.k_norm = HeadNorm(spec.head_dim), HeadNorm(spec.head_dim)

    def forward(self, x, inv_freq, batch: PackedBatch, attn: AttentionFn) -> torch.Tensor:
        s = self.spec
        q, k, v = self.qkv_proj(x).split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q, k = q.view(-1, s.num_heads, s.head_dim), k.view(-1, s.num_kv_heads, s.head_dim)
        # in place, inside the fused QKV output
        if s.qk_norm:
            self.ops.qk_norm_rope(q, k, batch.positions, inv_freq, self.q_norm.weight, self.k_norm.weight,
                                  s.rms_norm_eps)
        else:
            self.ops.rope(q, k, batch.positions, inv_freq)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        cu, m = batch.cu_seqlens, batch.max_seqlen
        if batch.kv_idx is None:
            o = attn(q, k, v, cu, cu, m, m, self.scale)
        else:  # shared prefixes: each sequence's keys are [its group's prefix ; its own tokens]
            k, v = k[batch.kv_idx], v[batch.kv_idx]
            o = attn(q, k, v, cu, batch.cu_seqlens_k, m, batch.max_seqlen_k, self.scale)
        return self.o_proj(o.reshape(-1, s.q_size))


class MLP(nn.Module):
    ops: Ops = TORCH_OPS

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_up_proj = _linear(spec.hidden_size, 2 * spec.intermediate_size)
        self.down_proj = _linear(spec.intermediate_size, spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, residual, inv_freq, batch, attn):
        """x: the previous sublayer's output, residual: the stream before it (None in layer 0).
        Returns this layer's MLP output and the stream before it; the next norm adds them."""
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, inv_freq, batch, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Backbone(nn.Module):
    """forward(batch) -> final hidden states [T, hidden] after the last RMSNorm."""

    def __init__(self, spec: ModelSpec, attn: AttentionFn = attention_ref):
        super().__init__()
        self.spec = spec
        self.attn = attn
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.register_buffer("inv_freq", rope.inv_freq(spec.rope, spec.head_dim), persistent=False)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x, residual = self.embed_tokens(batch.tokens), None
        for layer in self.layers:
            x, residual = layer(x, residual, self.inv_freq, batch, self.attn)
        return self.norm(x, residual)[0]

    def use_kernels(self, ops: Ops) -> None:
        """Run RMSNorm (+ residual add), RoPE and SiLU*up through `ops` (kernels/dispatch.py)."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP)):
                m.ops = ops
