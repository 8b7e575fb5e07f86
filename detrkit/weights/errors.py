"""The one error for weights and training checkpoints that cannot be used."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A weights file or training checkpoint that is missing, truncated, damaged or of another kind;
    the message names the file and what is wrong."""
