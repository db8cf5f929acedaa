"""The DeepSeek-V2/V3 family network, its config and its weight loader."""
from engine.model.config import ModelConfig, load_config, parse_config
from engine.model.errors import ModelLoadError

__all__ = ["ModelConfig", "ModelLoadError", "load_config", "parse_config"]
