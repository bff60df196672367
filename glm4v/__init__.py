"""glm4v: a standalone runtime for GLM-4V-9B (no transformers, no remote code)."""

from glm4v.errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    ConversationError,
    Glm4vError,
    ImageError,
    InputError,
)

__version__ = "0.1.0"


def load(path=None, dtype="float32", device="cpu", **kwargs):
    """Load a model folder in the official layout; ``path=None`` loads the embedded model."""
    from glm4v.engine import load as _load

    return _load(path, dtype=dtype, device=device, **kwargs)


def load_tokenizer(path=None):
    """Load the tokenizer of a model folder (tokenizer.model + tokenizer_config.json)."""
    from glm4v.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


__all__ = [
    "load",
    "load_tokenizer",
    "Glm4vError",
    "InputError",
    "ImageError",
    "ConversationError",
    "ContextLengthError",
    "CheckpointError",
    "ConfigError",
]
