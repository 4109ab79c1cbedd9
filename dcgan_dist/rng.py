"""Training's random streams, kept apart from everything that is not a training step.

Exact resume restores the global RNG states saved in a checkpoint (torch's CPU and CUDA generators, numpy's,
Python's ``random``) and relies on nothing else drawing from them: building an evaluation model (``nn.Conv2d``
initialises its weights from torch's global generator), evaluating, sampling grids. Such work runs under
``isolated_rng()``, so whether and when it runs (a resume builds the evaluator again, mid-training) never
shifts the noise the training steps draw.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def isolated_rng():
    """Run the block (or, as ``@isolated_rng()``, the function) with every global RNG stream restored after it:
    torch's CPU generator and the current CUDA device's (if CUDA is in use), numpy's and Python's ``random``."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
