"""Run under accelerate launch. Mode `train`: launch/train.py's train() with --set overrides, then every
rank writes a hash of each parameter and buffer. Mode `collectives`: count the all-reduces DDP issues for
G and D during gan_step, and check the G step leaves D's gradients untouched."""

import hashlib
import json
import os
import sys

import torch
from threads_at_exit import gloo_threads
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from dcgan_dist.config import load_config
from dcgan_dist.train.loop import _accelerator, build, resolve_precision, train
from dcgan_dist.train.step import gan_step


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def main():   # guarded: the loader's workers start from a fork server, which imports __main__ (see loader.worker_context)
    mode, out, config, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    if mode == "train":
        summary = train(cfg)
        G, D, E = summary["models"]
        rank = summary["rank"]                  # end_training() has already torn the process group down
        nets = (("G", G), ("D", D), ("E", E)) if E is not None else (("G", G), ("D", D))
        result = {"num_processes": summary["num_processes"], "rank": rank, "corrupt_chunks": summary["corrupt_chunks"],
                  "gloo_threads": gloo_threads(),        # gone with the group, before the interpreter finalizes
                  "params": {f"{n}.{k}": digest(v) for n, m in nets for k, v in m.named_parameters()},
                  "buffers": {f"{n}.{k}": digest(v) for n, m in nets for k, v in m.named_buffers()}}
    else:
        acc = _accelerator(cfg, "disabled")
        cfg.train.precision = resolve_precision(cfg.train.precision, acc.device)   # as the loop hands it to gan_step
        nets = build(acc, cfg)
        counts = {"G": 0, "D": 0}

        def counting(name):
            def hook(state, bucket):
                counts[name] += 1
                return allreduce_hook(None, bucket)
            return hook

        nets.G.register_comm_hook(None, counting("G"))
        nets.D.register_comm_hook(None, counting("D"))
        torch.manual_seed(acc.process_index)
        per_step, d_grad_unchanged = [], []
        orig_step = nets.opt_g.step

        def g_step_spy(*a, **k):        # called inside the G step, after its backward
            d_grad_unchanged.append(all(torch.equal(p.grad, before[i]) for i, p in enumerate(nets.D.parameters())))
            return orig_step(*a, **k)

        nets.opt_g.step = g_step_spy
        orig_d_step = nets.opt_d.step
        before = []

        def d_step_spy(*a, **k):        # snapshot D's grads as the D step leaves them
            nonlocal before
            before = [p.grad.clone() for p in nets.D.parameters()]
            return orig_d_step(*a, **k)

        nets.opt_d.step = d_step_spy
        for _ in range(3):
            c0 = dict(counts)
            real = torch.rand(cfg.train.batch_size, cfg.data.channels, cfg.data.resolution, cfg.data.resolution) * 2 - 1
            gan_step(acc, nets, real, cfg, 0.0)
            per_step.append({k: counts[k] - c0[k] for k in counts})
        rank = acc.process_index
        result = {"num_processes": acc.num_processes, "per_step": per_step, "d_grad_unchanged": d_grad_unchanged,
                  "d_grads_left": sum(p.grad is not None for p in nets.D.parameters())}
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    if mode != "train":
        # A Python comm hook ran on gloo's threads: tearing the interpreter down with it registered aborted a
        # rank now and then ("terminate called without an active exception", SIGABRT), even after
        # end_training (seen again 2026-12-01). The result is written; leave without the teardown. (train()
        # registers no hook: the trainer never needs this.)
        torch.distributed.barrier()
        acc.end_training()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
