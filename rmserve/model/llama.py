"""The Llama backbone over packed tokens. Parameter names follow Hugging Face's, under `model.`,
except the two fused projections made at load (see loader.PACKED)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelSpec
from ..packing import PackedBatch
from . import rope
from .attention import AttentionFn, attention_ref


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: statistics in fp32, scale applied after casting back."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=False)
    layer.weight.requires_grad_(False)
    return layer


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.qkv_proj = _linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size)
        self.o_proj = _linear(spec.q_size, spec.hidden_size)
        self.scale = spec.head_dim ** -0.5

    def forward(self, x, cos, sin, batch: PackedBatch, attn: AttentionFn) -> torch.Tensor:
        s = self.spec
        q, k, v = self.qkv_proj(x).split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = rope.apply_rope_ref(q.view(-1, s.num_heads, s.head_dim), cos, sin)
        k = rope.apply_rope_ref(k.view(-1, s.num_kv_heads, s.head_dim), cos, sin)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        cu, m = batch.cu_seqlens, batch.max_seqlen
        if batch.kv_idx is None:
            o = attn(q, k, v, cu, cu, m, m, self.scale)
        else:  # shared prefixes: each sequence's keys are [its group's prefix ; its own tokens]
            k, v = k[batch.kv_idx], v[batch.kv_idx]
            o = attn(q, k, v, cu, batch.cu_seqlens_k, m, batch.max_seqlen_k, self.scale)
        return self.o_proj(o.reshape(-1, s.q_size))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_up_proj = _linear(spec.hidden_size, 2 * spec.intermediate_size)
        self.down_proj = _linear(spec.intermediate_size, spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, batch, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
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
        x = self.embed_tokens(batch.tokens)
        cos, sin = rope.cos_sin(batch.positions, self.inv_freq, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, batch, self.attn)
        return self.norm(x)
