"""Run under accelerate launch: every rank reads `epochs` epochs and all-reduces once per batch
(a rank with fewer batches would hang the others; the launcher's timeout catches it)."""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import PartialState

from dcgan_dist.data import ShardLoader

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))   # tests/: synthetic.py
from synthetic import image_index  # noqa: E402


def main():   # guarded: the loader's workers start from a fork server, which imports __main__ (see loader.worker_context)
    shards, out, batch, workers, seed, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        int(sys.argv[5]), int(sys.argv[6])
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=60))
    loader = ShardLoader(shards, batch_size=batch, rank=state.process_index, world_size=state.num_processes,
                         num_workers=workers, seed=seed)
    batches = []
    for x, y in loader:
        ids = image_index(x.numpy())
        assert (ids == y.numpy()).all()
        t = torch.tensor([len(x)], dtype=torch.int64)
        dist.all_reduce(t)
        assert t.item() == batch * state.num_processes, (t.item(), state.num_processes, state.distributed_type, dist.get_backend())
        batches.append(ids.tolist())
        if len(batches) == epochs * loader.batches_per_epoch:
            break
    with open(f"{out}.rank{state.process_index}.json", "w") as f:
        json.dump({"num_processes": state.num_processes, "batches_per_epoch": loader.batches_per_epoch,
                   "batches": batches}, f)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
