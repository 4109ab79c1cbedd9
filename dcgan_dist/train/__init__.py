"""Training: the loop (loop.py), one GAN update (step.py), checkpoints, tracking."""

from .loop import describe, train

__all__ = ["train", "describe"]
