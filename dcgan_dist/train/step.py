"""One GAN update: D step, then G step, with the DDP and mixed-precision details named in one place."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from ..augment import diff_augment
from ..losses import d_loss, d_targets, g_loss
from .ema import EMA

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# The R1 penalty's double backward leaves D's conv weight gradients in another memory layout than DDP's bucket
# views (channels_last); DDP copies them on those steps and warns: harmless (pytorch/pytorch#70222), not repeated.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


@dataclass
class Nets:
    """The prepared (DDP-wrapped where distributed) networks, their optimizers and loss scalers."""
    G: torch.nn.Module
    D: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    ema: EMA | None = None               # G_ema (model.ema), outside DDP
    precision: str = "fp32"              # what the step autocasts to: train.precision resolved (loop.resolve_precision)


def make_optimizers(G: torch.nn.Module, D: torch.nn.Module, optim, cuda: bool, capturable: bool = False):
    """Adam for G and for D with ``optim``'s (OptimConfig) lr_g, lr_d and betas; on CUDA fused (one kernel per
    step, and fp16 skips without a host read, see _apply). ``capturable``: its state on the device, as a CUDA
    graph of the whole step needs (capture_step)."""
    betas = (optim.beta1, optim.beta2)
    return (torch.optim.Adam(G.parameters(), lr=optim.lr_g, betas=betas, fused=cuda, capturable=capturable),
            torch.optim.Adam(D.parameters(), lr=optim.lr_d, betas=betas, fused=cuda, capturable=capturable))


def make_scalers(precision: str, device_type: str, init_scale: float):
    """One GradScaler per network: with Accelerate's single shared scaler an overflow in D also
    halves G's scale. Disabled (a pass-through) for fp32 and bf16."""
    on = precision == "fp16"
    return (torch.amp.GradScaler(device_type, init_scale=init_scale, enabled=on),
            torch.amp.GradScaler(device_type, init_scale=init_scale, enabled=on))


@torch.no_grad()
def mean_bn_stats(acc, module: torch.nn.Module) -> None:
    """Replace ``module``'s BatchNorm running statistics by their mean over the ranks (one small all-reduce).

    In training mode BatchNorm normalises with the batch's own statistics, so this never changes training; it
    makes the running statistics, which eval mode uses (grids, samples, FID, G_ema), those of the global batch
    and identical on every rank. Without it each rank keeps its own (DDP does not broadcast buffers here), and
    since a checkpoint holds rank 0's, a resumed rank 1 would continue from other statistics than it had.
    """
    stats = [b for b in module.buffers() if b.is_floating_point()]       # not num_batches_tracked
    if acc.num_processes > 1 and stats:
        flat = acc.reduce(torch.cat([b.flatten() for b in stats]), reduction="mean")
        for b, mean in zip(stats, flat.split([b.numel() for b in stats])):
            b.copy_(mean.view_as(b))


AUTOCAST_CACHE = True    # False while a CUDA graph captures the step: capture refuses autocast's cast cache


def autocast(precision: str, device_type: str):
    dtype = AMP_DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype, cache_enabled=AUTOCAST_CACHE) if dtype else contextlib.nullcontext()


def capture_step(step_fn, warmup: int = 3):
    """``step_fn()`` (one whole GAN step: forwards, backwards, both optimizer updates) captured in one CUDA
    graph; returns its replay, which re-runs every kernel with one launch. A DCGAN step is ~300 small kernels,
    so eager mode is launch-bound at 64 px. Needs static inputs (``step_fn`` reads the same tensors each time),
    capturable optimizers (``Adam(capturable=True)``) and fp32/bf16 (GradScaler's fp16 bookkeeping is host-side
    Python state that a replay would not update). The PyTorch recipe "whole-network capture":
    https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs"""
    global AUTOCAST_CACHE
    AUTOCAST_CACHE = False
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                # warm-up on a side stream, as capture requires
            for _ in range(warmup):
                step_fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step_fn()
    finally:
        AUTOCAST_CACHE = True
    return graph.replay


@contextlib.contextmanager
def frozen(accelerator, module: torch.nn.Module):
    """Run a DDP module without gradient sync and without weight gradients (G step through D):
    no all-reduce of D's gradients, no work spent computing them; input gradients still flow."""
    params = [p for p in module.parameters()]
    with accelerator.no_sync(module):
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def _apply(scaler: torch.amp.GradScaler, loss: torch.Tensor, opt) -> torch.Tensor:
    """Scaled backward + step + scale update. Returns a 0-dim bool tensor on the loss's device, True when the
    step was skipped (inf/NaN gradients in fp16), without reading anything back to the host: the scale is
    compared on the device (``GradScaler.get_scale()`` is a host synchronisation), and the scaler steps the
    optimizer inside Accelerate's wrapper, so that a fused Adam (CUDA) takes the scale and the inf flag as
    tensors instead of GradScaler's ``found_inf.item()``."""
    scaler.scale(loss).backward()
    if not scaler.is_enabled():                      # fp32 / bf16: no scale, never skipped
        opt.step()
        return torch.zeros((), dtype=torch.bool, device=loss.device)
    before = scaler._scale.clone()                   # the scale tensor (private; exists in torch 2.2 to 2.14)
    scaler.step(getattr(opt, "optimizer", opt))      # AcceleratedOptimizer.step only forwards here (no accumulation)
    scaler.update()
    return scaler._scale < before


def _d_input(x: torch.Tensor, cfg, noise_std: float) -> torch.Tensor:
    """What D sees of an image batch: DiffAugment (loss.augment), then instance noise (annealed by the caller)."""
    if cfg.loss.augment:
        x = diff_augment(x, cfg.loss.augment)
    return x + noise_std * torch.randn_like(x) if noise_std > 0 else x


def r1_penalty(logits_real: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """E_x ||grad_x D(x)||^2 (float32, 0-dim) over the batch: the R1 penalty of Mescheder et al. 2018, "Which
    Training Methods for GANs do actually Converge?", before its gamma / 2. ``logits_real``: D's logits (B,) of
    ``x`` (B x C x H x W, requires grad), from a float32 forward (gan_step runs it outside autocast), so the
    gradient needs no loss scaling. It keeps its graph: the penalty is trained through."""
    (grad,) = torch.autograd.grad(logits_real.float().sum(), x, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


def gan_step(acc, nets: Nets, real: torch.Tensor, cfg, noise_std: float, r1_weight: float = 0.0) -> dict:
    """D update on (real, G(z)), then G update through D. ``real``: B x C x H x W float in [-1, 1] on the
    device. ``r1_weight`` > 0 adds r1_weight / 2 x the R1 penalty on D's real inputs to D's loss (the caller
    passes gamma x r1_every on the steps that regularise). Returns 0-dim tensors on the device (losses, mean D(x)
    and D(G(z)), skip flags): nothing in the step reads a value back to the host; the caller does that at its
    sync points."""
    dev, prec, kind = real.device, nets.precision, cfg.loss.kind
    n = real.shape[0]
    z = torch.randn(n, cfg.model.latent, device=dev)

    # --- D step: D's gradients are all-reduced here, once, by the backward.
    with autocast(prec, dev.type):
        fake = nets.G(z)        # kept with its graph: the G step reuses it (one G forward per step)
        real_in = _d_input(real, cfg, noise_std)
        if r1_weight:
            real_in = real_in.detach().requires_grad_(True)
        # BatchNorm's double backward returned NaN in fp16 (on the CPU; its sums run in the input's dtype), so
        # the regularised steps run D on the reals in fp32 under any autocast (1 step in loss.r1_every). Only
        # ever disable here: torch.autocast(enabled=True) without a dtype would turn on bf16 on the CPU.
        with torch.autocast(dev.type, enabled=False) if r1_weight else contextlib.nullcontext():
            logits_real = nets.D(real_in)
        logits_fake = nets.D(_d_input(fake.detach(), cfg, noise_std))
        t_real, t_fake = d_targets(n, cfg.loss.real_label, cfg.loss.flip_prob, dev)
        loss_d = d_loss(kind, logits_real, logits_fake, t_real, t_fake)
        penalty = r1_weight / 2 * r1_penalty(logits_real, real_in) if r1_weight else 0.0
    nets.opt_d.zero_grad(set_to_none=True)
    skipped_d = _apply(nets.scaler_d, loss_d + penalty, nets.opt_d)      # loss_d is logged without the penalty

    # --- G step: through D without its gradient sync or weight gradients; only G's grads all-reduce.
    with frozen(acc, nets.D), autocast(prec, dev.type):
        logits_gen = nets.D(_d_input(fake, cfg, noise_std))
        loss_g = g_loss(kind, logits_gen)
    nets.opt_g.zero_grad(set_to_none=True)
    skipped_g = _apply(nets.scaler_g, loss_g, nets.opt_g)

    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_real": torch.sigmoid(logits_real.detach().float()).mean(),
            "d_fake": torch.sigmoid(logits_fake.detach().float()).mean(),
            "skipped_d": skipped_d, "skipped_g": skipped_g}


def d_only_step(acc, nets: Nets, real: torch.Tensor, cfg, noise_std: float) -> torch.Tensor:
    """An extra D update (loss.d_steps > 1): fakes from G without a graph. Returns a 0-dim bool tensor, True
    when fp16 skipped it (inf/NaN gradients), to be counted in skipped_d like the GAN step's D update."""
    dev, prec = real.device, nets.precision
    z = torch.randn(real.shape[0], cfg.model.latent, device=dev)
    with autocast(prec, dev.type):
        with torch.no_grad():
            fake = nets.G(z)
        real, fake = _d_input(real, cfg, noise_std), _d_input(fake, cfg, noise_std)
        t_real, t_fake = d_targets(real.shape[0], cfg.loss.real_label, cfg.loss.flip_prob, dev)
        loss = d_loss(cfg.loss.kind, nets.D(real), nets.D(fake), t_real, t_fake)
    nets.opt_d.zero_grad(set_to_none=True)
    return _apply(nets.scaler_d, loss, nets.opt_d)
