"""glm4v: a standalone runtime for GLM-4V-9B (no transformers, no remote code)."""

import os

# Large tensors (the weights above all) on 2 MB pages: torch's CPU allocator asks the kernel for
# transparent huge pages when this is set before its first allocation. A decode step streams every
# weight once, and on 4 KB pages each GEMV walks thousands of page-table entries: with int4 weights
# at full widths on a Zen 3 EPYC, decode steps ran 4-8 % faster on 2 MB pages (the two page sizes
# interleaved in one process; docs/PERFORMANCE.md). Takes effect only when glm4v is imported before
# torch; a value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from glm4v.errors import (  # noqa: E402
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
