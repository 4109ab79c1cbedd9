"""The DCGAN paper's generator and discriminator for 32, 64 and 128 px, 1 or 3 channels."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn


def _n_layers(resolution: int) -> int:
    if resolution not in (32, 64, 128):
        raise ValueError(f"resolution must be 32, 64 or 128, not {resolution}")
    return int(math.log2(resolution)) - 2          # upsamplings from 4x4 to the resolution


class Generator(nn.Module, PyTorchModelHubMixin, library_name="dcgan_dist",
                pipeline_tag="unconditional-image-generation", tags=["dcgan", "gan"]):
    """z (B x latent) -> image (B x C x R x R) in [-1, 1]: transposed convs, BatchNorm, ReLU, Tanh.

    ``save_pretrained(DIR)`` / ``Generator.from_pretrained(DIR or Hub repo id)`` (huggingface_hub's mixin):
    model.safetensors plus config.json with the four constructor arguments; launch/export.py writes such a folder
    from a checkpoint. Loading is strict (every tensor must fit) and returns the generator in eval mode.
    """

    def __init__(self, latent: int = 100, ngf: int = 64, channels: int = 3, resolution: int = 64) -> None:
        super().__init__()
        n = _n_layers(resolution)
        width = [ngf * 2 ** (n - 1 - i) for i in range(n)]         # 64 px: 8, 4, 2, 1 x ngf
        layers = [nn.ConvTranspose2d(latent, width[0], 4, 1, 0, bias=False), nn.BatchNorm2d(width[0]), nn.ReLU(True)]
        for a, b in zip(width, width[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.latent = latent
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        # the mixin's default is strict=False (missing tensors left random, silently) and train mode
        return super()._from_pretrained(strict=strict, **kwargs).eval()


class Discriminator(nn.Module):
    """image (B x C x R x R) -> logits (B,): strided convs, LeakyReLU 0.2 and, by ``norm``:

    - ``"batch"`` (the DCGAN paper's): BatchNorm after every conv but the first and the last;
    - ``"spectral"``: no BatchNorm; every conv's weight divided by its largest singular value, estimated by one
      power iteration per forward in training mode (spectral normalisation, Miyato et al. 2018, "Spectral
      Normalization for Generative Adversarial Networks"; torch.nn.utils.parametrizations.spectral_norm),
      which bounds D's Lipschitz constant; convs then carry a bias, as the paper's.
    """

    def __init__(self, ndf: int = 64, channels: int = 3, resolution: int = 64, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "spectral"):
            raise ValueError(f"norm must be 'batch' or 'spectral', not {norm!r}")
        n, sn = _n_layers(resolution), norm == "spectral"
        width = [ndf * 2 ** i for i in range(n)]                     # 64 px: 1, 2, 4, 8 x ndf
        layers = [nn.Conv2d(channels, width[0], 4, 2, 1, bias=sn), nn.LeakyReLU(0.2, True)]
        for a, b in zip(width, width[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=sn), *([] if sn else [nn.BatchNorm2d(b)]), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(width[-1], 1, 4, 1, 0, bias=sn)]       # 4x4 -> 1x1 logit; no sigmoid
        self.norm = norm
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()

    def spectral_norm_(self) -> "Discriminator":
        """Register the spectral normalisation of every conv (norm="spectral"; after the weights' init, since
        the parametrisation keeps the initialised weight as its ``original``). Returns self."""
        if self.norm == "spectral":
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(m)
        return self


@torch.no_grad()
def dcgan_init(module: nn.Module) -> None:
    """The paper's init: conv weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_models(cfg) -> tuple[Generator, Discriminator]:
    """G and D from a Config, initialised as configured."""
    g = Generator(cfg.model.latent, cfg.model.ngf, cfg.data.channels, cfg.data.resolution)
    d = Discriminator(cfg.model.ndf, cfg.data.channels, cfg.data.resolution, cfg.model.d_norm)
    if cfg.model.init_g:
        dcgan_init(g)
    if cfg.model.init_d:
        dcgan_init(d)
    return g, d.spectral_norm_()


STANDING_BATCH = 256          # latents per forward while standing statistics are computed
STANDING_SEED = 20190228      # their latents' seed: the statistics are a function of the weights alone


@torch.no_grad()
def standing_stats(g: nn.Module, n: int, rank: int = 0, world: int = 1, reduce_sum=None) -> nn.Module:
    """A copy of generator ``g`` (with a ``latent`` attribute) in eval mode whose BatchNorm running means and
    variances are its own "standing statistics" (Brock et al. 2019, BigGAN, sec. 3.1; there of the EMA
    generator): the mean, over ceil(n / STANDING_BATCH) training-mode forwards of N(0, 1) latents drawn on the CPU
    from STANDING_SEED, of each batch's mean and unbiased variance per channel (what torch's BatchNorm with
    ``momentum=None`` accumulates). ``g`` is not changed; ``n`` = 0 returns it as it is.

    Why: running statistics that training leaves (momentum 0.1, ~10 recent batches) belong to G's weights of the
    last steps, not to G_ema's, and are noisy: on Fashion-MNIST one checkpoint's FID read 0.234 with them and
    0.147 with these; with 2,048 latents three seeds read 0.204 to 0.251, with 16,384 two read 0.235 and 0.242,
    with 65,536 0.231 (docs/quality.md). With ``world`` > 1 the batches are dealt to the ranks (batch b to rank
    b % world) and ``reduce_sum`` (a collective: every rank calls it once) adds their sums, so each rank gets the
    same statistics in 1 / world of the time. Draws nothing from the global random generators."""
    import copy

    if n <= 0:
        return g
    g = _plain_batchnorm(copy.deepcopy(g))
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    device = next(g.parameters()).device
    sizes = [min(STANDING_BATCH, n - start) for start in range(0, n, STANDING_BATCH)]
    gen = torch.Generator().manual_seed(STANDING_SEED)
    widths = [m.num_features for m in bns]
    flat = torch.zeros(2, sum(widths), dtype=torch.float64, device=device)   # every layer's sums: one collective
    g.train()
    for b, size in enumerate(sizes):
        z = torch.randn(size, g.latent, generator=gen)      # every rank draws every batch's latents: same stream
        if b % world != rank:
            continue
        for m in bns:
            m.reset_running_stats()
            m.momentum = 1.0                                # running = this batch's statistics
        g(z.to(device))
        for total, m in zip(flat.split(widths, dim=1), bns):              # views into flat
            total += torch.stack([m.running_mean, m.running_var]).double()
    if world > 1:
        flat = reduce_sum(flat)
    for total, m, momentum in zip(flat.split(widths, dim=1), bns, momenta):
        m.running_mean.copy_(total[0] / len(sizes))
        m.running_var.copy_(total[1] / len(sizes))
        m.num_batches_tracked.fill_(len(sizes))
        m.momentum = momentum
    g.standing_stats = n
    return g.eval()


def _plain_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every SyncBatchNorm (model.sync_bn) replaced by a BatchNorm2d holding the same tensors (the
    standing statistics' forwards run per rank, where a SyncBatchNorm would reduce over the ranks)."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            _plain_batchnorm(child)
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


EMA_FILE = "ema.safetensors"          # G_ema's parameters and buffers in a checkpoint (model.ema)


def load_generator(checkpoint: Path, device: str = "cpu", raw: bool = False,
                   standing: int | None = None) -> tuple[Generator, str, object]:
    """G_ema (or G with ``raw``, or when the checkpoint has no G_ema) from a checkpoint folder: its config.toml
    gives the architecture, the safetensors file the weights (loading never unpickles anything), and
    ``standing`` (default: its ``eval.standing_stats``) the latents its BatchNorm statistics are recomputed from
    (standing_stats; 0: as saved).
    Returns the generator (eval mode), which one it is ("G_ema" or "G") and the run's Config."""
    from safetensors.torch import load_file

    from .config import load_config
    from .errors import UserError, brief

    checkpoint = Path(checkpoint)
    if not (checkpoint / "model.safetensors").is_file() or not (checkpoint / "config.toml").is_file():
        raise UserError(f"{checkpoint}: not a complete checkpoint (needs model.safetensors and config.toml)")
    cfg = load_config(checkpoint / "config.toml")
    g = Generator(cfg.model.latent, cfg.model.ngf, cfg.data.channels, cfg.data.resolution)
    which = "G" if raw or not (checkpoint / EMA_FILE).is_file() else "G_ema"
    path = checkpoint / ("model.safetensors" if which == "G" else EMA_FILE)
    try:
        weights = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise UserError(f"{path}: cannot be read ({str(e)[:120]}); the file is damaged: use another "
                        f"checkpoint" + ("" if which == "G" else " or --raw")) from None
    try:
        g.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{checkpoint}: weights do not fit the generator its config.toml describes "
                        f"({brief(e, 160)})") from None
    n = cfg.eval.standing_stats if standing is None else standing
    return standing_stats(g.to(device), n).eval(), which, cfg
