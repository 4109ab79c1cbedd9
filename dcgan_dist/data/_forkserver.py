"""Imported once by each process's fork server (see loader.worker_context) before it forks a loader worker.

What every worker needs is imported here, once per rank, so a worker starts in milliseconds; and the stop
signals are ignored, as in the workers: SLURM signals every process of a job step, and a fork server killed by
that signal would take the next workers with it. The rank decides when to stop and kills its workers itself.
"""

import torch  # noqa: F401 - the import a worker would otherwise pay (seconds)

from .loader import _ignore_stop_signals

_ignore_stop_signals(0)
