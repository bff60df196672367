"""Exceptions that carry a message meant for the user.

Every failure caused by what a user or client supplied (an image, a prompt, a request, a checkpoint
folder) raises a subclass of ``Glm4vError`` with a message that says what was wrong and what the
limit or expectation was. Callers (CLI, server) turn these into exit codes and HTTP 4xx answers;
anything else escaping is a bug.
"""


class Glm4vError(Exception):
    """Base class of every error glm4v raises on purpose."""


class InputError(Glm4vError, ValueError):
    """Bad user input: an image, a message, a generation parameter."""


class ImageError(InputError):
    """An image that cannot be used: corrupt, unsupported, too large."""


class ConversationError(InputError):
    """A conversation that breaks the chat format (roles, several images, ...)."""


class ContextLengthError(InputError):
    """Prompt (text + image tokens) plus requested new tokens exceed the context window."""


class CheckpointError(Glm4vError, OSError):
    """A model folder or weight file that cannot be loaded."""


class ConfigError(CheckpointError):
    """A config.json with a missing, wrong-typed or inconsistent key."""
