"""The suite's own settings (conftest.py): what keeps it within its timeouts on a busy shared machine."""

import os
import subprocess
import sys


def test_the_test_process_and_the_processes_it_starts_use_one_torch_thread():
    import torch

    threads = os.environ["OMP_NUM_THREADS"]           # "1" unless the environment set it before pytest started
    assert torch.get_num_threads() == int(threads)
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                       text=True, timeout=120, check=True)
    assert p.stdout.strip() == threads
