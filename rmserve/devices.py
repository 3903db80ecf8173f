"""The engine's device made current around work that follows the *current* CUDA device.

Most of PyTorch takes its device from the tensors, but some work does not: Triton launches a
kernel on `torch.cuda.current_device()`'s current stream, whatever device its pointers are on;
`torch.cuda.Event().record()` and `torch.cuda.synchronize()` use the current device; a CUDA
graph captures on a stream of the device current when the stream was made. On `cuda:1` with
device 0 current, that is a kernel launched on the wrong GPU, a graph captured empty, or an
event that does not wait for the batch it stands for. Every CUDA-only step of an engine
(memory planning, graph capture and replay, the batch pipeline's copies, events and forward,
sampling) runs inside `on_device(engine.device)`.

Callers look the function up on this module (`devices.on_device(...)`), so tests can watch it.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def on_device(device: torch.device) -> ContextManager:
    """`torch.cuda.device(device)` for a CUDA device (restores the previous one on exit); a no-op
    context for any other device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
