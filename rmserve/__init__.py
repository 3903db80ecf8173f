"""rmserve: exact, fast inference for Llama-3 reward models, loaded from their real checkpoints.

The names below load on first use (PEP 562), so that `import rmserve.cli` and `rmserve --help`
do not import torch."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
_WHERE = {"Engine": "engine", "EngineConfig": "engine", "ScoreResult": "results", "ModelSpec": "config",
          "ConfigError": "config", "CheckpointError": "loader", "InputError": "inputs"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'rmserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
