"""One typed schema for every setting. TOML files state only what differs; defaults live here.

    cfg = load_config("configs/lsun.toml", overrides=["train.batch_size=64"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .augment import parse_policy
from .errors import UserError


@dataclass
class DataConfig:
    shards: str = "data/digits"          # folder with manifest.json (launch/prepare_data.py)
    resolution: int = 64                 # must match the shards: 32, 64 or 128
    channels: int = 3                    # must match the shards: 1 or 3
    workers: int = 2                     # loader worker processes per rank (0: in the main process)
    shuffle_window: int = 4096           # images shuffled together (see dcgan_dist/data/loader.py)
    verify: str = "size"                 # shard check before training: size | sha256 | none
    cache_dir: str = ""                  # remote shards (s3/gs/http): keep fetched chunks here ("": no cache)
    cache_gb: float = 20.0               # ... up to this size, least recently used out first
    timeout_s: float = 30.0              # remote shards: one request (connect + whole answer) at most this long
    deadline_s: float = 120.0            # ... one read with all its retries at most this long (then: an error)
    batch_timeout_s: float = 600.0       # any shards: no batch for this long is an error naming the workers (0: none)


@dataclass
class ModelConfig:
    latent: int = 100                    # nz, the size of z
    ngf: int = 64                        # generator width
    ndf: int = 64                        # discriminator width
    d_norm: str = "batch"                # D's normalisation: batch (the paper's BatchNorm) | spectral
                                         # (spectral normalisation, Miyato et al. 2018; no BatchNorm in D)
    init_g: bool = True                  # DCGAN init N(0, 0.02) conv / N(1, 0.02) BN scale for G
    init_d: bool = True                  # ... and for D
    sync_bn: bool = False                # SyncBatchNorm across GPUs (CUDA only)
    ema: bool = True                     # keep G_ema, an exponential moving average of G (grids, samples, FID)
    ema_kimg: float = 10.0               # its half-life in thousands of images seen (all ranks together)
    ema_rampup: float = 0.05             # half-life at most this fraction of the images seen so far (0: off)


@dataclass
class LossConfig:
    kind: str = "bce"                    # bce (non-saturating, the paper's) | hinge | lsgan
    real_label: float = 1.0              # one-sided label smoothing: e.g. 0.9 (bce, lsgan)
    flip_prob: float = 0.0               # chance of swapping a sample's real/fake target for D
    instance_noise: float = 0.0          # std of Gaussian noise on D's inputs at step 0
    instance_noise_steps: int = 0        # ... annealed linearly to 0 over this many steps
    d_steps: int = 1                     # D updates per G update
    augment: str = ""                    # DiffAugment of every image D sees (real and generated), e.g.
                                         # "translation,cutout" or "color,translation,cutout" ("": off);
                                         # against a D that memorises a small dataset (dcgan_dist/augment.py)
    r1_gamma: float = 0.0                # R1 penalty gamma/2 E||grad_x D(x)||^2 on D's real inputs (0: off)
    r1_every: int = 16                   # ... lazily: every N steps, weighted by N (StyleGAN2's regularisation)


@dataclass
class OptimConfig:
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    decay_from: float = 1.0              # from this fraction of train.max_steps on, both lrs fall linearly to 0
                                         # at max_steps (1.0: constant lr, the paper's)


@dataclass
class TrainConfig:
    batch_size: int = 128                # per process (per GPU)
    max_steps: int = 10000               # G updates
    max_epochs: int = 0                  # stop after this many epochs too (0: no limit)
    seed: int = 0
    precision: str = "auto"              # auto | fp32 | bf16 | fp16 (loss-scaled); wins over accelerate's flag.
                                         # auto: bf16 on a GPU with bf16 units (compute capability 8.0+), fp16
                                         # on older GPUs, fp32 on a CPU (where autocast is far slower)
    fp16_init_scale: float = 65536.0     # initial loss scale of each network's GradScaler
    channels_last: bool = True
    compile: bool = False                # torch.compile G and D
    broadcast_buffers: bool = False      # DDP buffer broadcast; False avoids the BN in-place error
    sync_every: int = 10                 # steps between the ranks' agreement on stop signals and the NaN guard
    dist_timeout_s: float = 600.0        # a collective waits this long for a lost rank (node down, link cut)
                                         # before every rank ends; above rank 0's longest lone work (a checkpoint
                                         # on slow storage, an evaluation cache) and data.batch_timeout_s


@dataclass
class LogConfig:
    every: int = 50                      # scalars to W&B and metrics.jsonl every N steps
    sample_every: int = 500              # fixed-noise grid every N steps (a multiple of log.every: a grid
                                         # logged at a step without scalars got a W&B media name one step early)
    n_samples: int = 64                  # images in the grid
    trackers: list[str] = field(default_factory=lambda: ["wandb"])   # any of "wandb", "tensorboard" (or [])
    wandb: str = "auto"                  # online | offline | disabled | auto
    project: str = "dcgan_dist"
    entity: str = ""
    progress_bar: bool = True
    raw_grid: bool = False               # with model.ema: also save the raw G's grid (samples/raw/)


@dataclass
class CheckpointConfig:
    every: int = 1000                    # steps between checkpoints (and one at the end)
    keep: int = 3                        # newest complete checkpoints kept
    milestone_every: int = 0             # also keep every checkpoint whose step is a multiple of this (0: none)
    resume: str = "auto"                 # auto (newest complete) | never | a checkpoint path (an older one of
                                         # this run: the newer ones are moved to <run>/abandoned/, never deleted)
    allow_changes: bool = False          # resume although batch size, seed, world size or data changed (the
                                         # run is then no longer an exact continuation; the changes are logged)


@dataclass
class EvalConfig:
    every: int = 0                       # steps between FID/KID evaluations during training (0: off)
    reference: str = ""                  # shards to compare with, e.g. the test split ("": the training shards);
                                         # the features still come from the training shards
    n: int = 50000                       # generated images per evaluation (and real images kept for KID)
    features: str = "auto"               # inception | classifier (trained on the shards' labels) | auto
                                         # (classifier for 1-channel shards, inception otherwise)
    inception_weights: str = ""          # the 2015-12-05 FID weights file ("": <cache_dir>/weights-inception-...)
    cache_dir: str = ""                  # reference statistics, classifiers ("": $XDG_CACHE_HOME/dcgan_dist)
    batch_size: int = 250                # images per generator/extractor call
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0                        # the latents of the generated set (the same every evaluation)
    standing_stats: int = 16384          # the evaluated, sampled or exported generator's BatchNorm statistics are
                                         # recomputed from this many latents first (BigGAN's standing statistics;
                                         # 0: the running statistics training left, noisy: see docs/quality.md)
    native_resolution: int = 0           # also judge in the data's pixel space at this size (0: off): Frechet
                                         # distance, precision/recall (k=3), pixel-std ratio (eval/native.py)


@dataclass
class Config:
    name: str = "dcgan"                  # run name; the run directory is <runs_dir>/<name>
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.resolution": (32, 64, 128), "data.channels": (1, 3), "data.verify": ("size", "sha256", "none"),
    "loss.kind": ("bce", "hinge", "lsgan"), "model.d_norm": ("batch", "spectral"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "log.wandb": ("online", "offline", "disabled", "auto"), "eval.features": ("auto", "inception", "classifier"),
}
TRACKERS = ("wandb", "tensorboard")
POSITIVE = {"model.latent", "model.ngf", "model.ndf", "loss.d_steps", "loss.r1_every", "train.batch_size",
            "train.max_steps", "log.every", "log.sample_every", "log.n_samples", "checkpoint.every", "checkpoint.keep",
            "optim.lr_g", "optim.lr_d", "train.fp16_init_scale", "data.shuffle_window", "train.sync_every",
            "model.ema_kimg", "eval.n", "eval.batch_size", "eval.kid_subsets", "eval.kid_subset_size",
            "data.timeout_s", "data.deadline_s", "train.dist_timeout_s"}
UNIT_INTERVAL = {"loss.real_label", "loss.flip_prob", "optim.beta1", "optim.beta2", "model.ema_rampup"}
# Upper bounds far above any real use, so an absurd value is a clear error rather than a failed allocation.
AT_MOST = {"model.latent": 16384, "model.ngf": 4096, "model.ndf": 4096, "train.batch_size": 1 << 16,
           "log.n_samples": 1024, "loss.d_steps": 100, "loss.r1_every": 10**6, "data.workers": 256,
           "train.seed": 2**63 - 1, "eval.seed": 2**31 - 1, "eval.n": 10**7, "eval.standing_stats": 10**7}


def _all_keys(cls=Config, prefix="") -> dict[str, type]:
    out = {}
    for f in fields(cls):
        t = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_all_keys(t, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = t
    return out


KEYS = _all_keys()
# Keys that older versions wrote into config.toml, read and ignored (train.precision_resolved: the resolved
# precision now lives in the checkpoint's train_state.json).
LEGACY = {"train.precision_resolved"}


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    if key not in KEYS:
        near = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.5) or \
            difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in KEYS], n=1)
        hint = f"; did you mean {_full(near[0])!r}?" if near else ""
        raise UserError(f"{where}: unknown key {key!r}{hint}")
    want = KEYS[key]
    if get_origin(want) is list:                      # a list of strings (log.trackers)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"{where}: {key} must be a list of strings such as [\"wandb\"], got {value!r}")
        want = list
    want = get_args(want)[0] if get_args(want) else want
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise UserError(f"{where}: {key} must be {want.__name__}, got {type(value).__name__} {value!r}")
    obj = cfg
    *parents, last = key.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, last, value)


def _full(name: str) -> str:
    return name if name in KEYS else next((k for k in KEYS if k.endswith("." + name)), name)


def flatten(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- TOML file <- ``section.key=value`` overrides (values in TOML syntax), then validate."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: no such config file") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a folder, not a config file (e.g. configs/digits.toml)") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: invalid TOML ({e})") from None
        for key, value in flatten(data).items():
            if key not in LEGACY:
                _set(cfg, key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected section.key=value, e.g. train.batch_size=64")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw                                 # bare words are strings: loss.kind=hinge
        _set(cfg, key, value, f"--set {item}")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    flat = flatten(cfg.to_dict())
    for key, value in flat.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} = {value!r}: must be a finite number")
    for key, most in AT_MOST.items():
        if flat[key] > most:
            raise UserError(f"{key} = {flat[key]!r}: must be <= {most}")
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise UserError(f"{key} = {flat[key]!r}: must be one of {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise UserError(f"{key} = {flat[key]!r}: must be > 0")
    for key in UNIT_INTERVAL:
        if not 0 <= flat[key] <= 1:
            raise UserError(f"{key} = {flat[key]!r}: must be between 0 and 1")
    for key in ("data.workers", "train.max_epochs", "loss.instance_noise", "loss.instance_noise_steps",
                "checkpoint.milestone_every", "train.seed", "eval.every", "eval.seed", "data.cache_gb",
                "data.batch_timeout_s", "eval.standing_stats", "loss.r1_gamma"):
        if flat[key] < 0:
            raise UserError(f"{key} = {flat[key]!r}: must be >= 0")
    try:
        parse_policy(cfg.loss.augment)
    except ValueError as e:
        raise UserError(f"loss.augment = {cfg.loss.augment!r}: {e}") from None
    for tracker in cfg.log.trackers:
        if tracker not in TRACKERS:
            raise UserError(f"log.trackers: unknown tracker {tracker!r}; choose from {', '.join(TRACKERS)}")
    if not cfg.name or cfg.name in (".", "..") or any(c in cfg.name for c in "/\\\0"):
        raise UserError(f"name = {cfg.name!r}: must be a folder name (not . or .., no / or \\)")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (scalars only, so a small writer suffices)."""
    lines = []
    top = {k: v for k, v in cfg.to_dict().items() if not isinstance(v, dict)}
    sections = {k: v for k, v in cfg.to_dict().items() if isinstance(v, dict)}
    for k, v in top.items():
        lines.append(f"{k} = {_toml_value(v)}")
    for name, section in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in section.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
