"""rmserve: exact, fast inference for Llama-3 reward models, loaded from their real checkpoints."""
from .config import ConfigError, ModelSpec
from .engine import Engine, EngineConfig
from .inputs import InputError
from .loader import CheckpointError
from .results import ScoreResult

__all__ = ["Engine", "EngineConfig", "ScoreResult", "ModelSpec", "ConfigError", "CheckpointError", "InputError"]
__version__ = "0.1.0"
