"""FID/KID: agreement with a direct numpy/scipy computation, a set against itself, the reference cache, one
process vs two, the Inception weights file (random weights of the real architecture), evaluation in training."""

import json
import re
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open

from conftest import accelerate_launch, run_cli, ROOT
from dcgan_dist.config import load_config
from synthetic import write_indexed_shards, write_random_inception
from dcgan_dist.errors import UserError
from dcgan_dist.eval import Dist
from dcgan_dist.eval.features import DigitClassifier, InceptionFeatures
from dcgan_dist.eval.metrics import fid_kid, reference
from dcgan_dist.train import train


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula, in numpy/scipy."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def numpy_kid(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al.), all samples as one subset."""
    d, m = a.shape[1], len(a)
    k = lambda x, y: (x @ y.T / d + 1) ** 3
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m ** 2)


def ref_of(feats: torch.Tensor) -> dict:
    f = feats.double()
    return {"sum": f.sum(0), "outer": f.T @ f, "n": torch.tensor(len(f)), "kid": feats.float()}


def test_fid_and_kid_agree_with_numpy_and_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (400, 8))
    b = rng.normal(0.3, 1.3, (400, 8)) @ rng.normal(0, 0.5, (8, 8))
    r = fid_kid(ref_of(torch.from_numpy(a)), torch.from_numpy(b).float(), Dist(), kid_subsets=1, kid_subset_size=400)
    assert r["fid"] == pytest.approx(numpy_fid(a, b.astype(np.float32)), rel=1e-5)
    assert r["kid"] == pytest.approx(numpy_kid(a.astype(np.float32), b.astype(np.float32)), rel=1e-3)
    assert r["n_fake"] == 400 and r["n_real"] == 400 and r["kid_std"] == 0.0
    assert numpy_fid(a, b) > 1                                     # a real difference, not a trivial 0


def test_a_set_against_itself_is_zero(tmp_path):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2000, 16, generator=gen) * 2 + 1
    same = fid_kid(ref_of(feats), feats, Dist(), kid_subsets=1, kid_subset_size=2000)
    other = fid_kid(ref_of(feats), torch.randn(2000, 16, generator=gen), Dist(), kid_subsets=1, kid_subset_size=2000)
    assert abs(same["fid"]) < 1e-6 and other["fid"] > 1
    # KID is unbiased: ~0 for another sample of the same distribution (not for the same sample: the estimator
    # leaves out only the diagonal of each set's own kernel matrix)
    twin = fid_kid(ref_of(feats), torch.randn(2000, 16, generator=gen) * 2 + 1, Dist(), kid_subsets=1,
                   kid_subset_size=2000)
    assert abs(twin["kid"]) < 0.01 * other["kid"]


def test_reference_statistics_are_cached_by_shards_extractor_and_count(tmp_path, monkeypatch):
    import dcgan_dist.eval.metrics as metrics
    shards = tmp_path / "shards"
    m = write_indexed_shards(shards, 96, resolution=32, channels=1, shard_size=32, chunk_size=16)
    net = DigitClassifier(1, 10)
    net.key = "random-a"
    cache = tmp_path / "cache"
    first = reference(net, shards, m, 50, cache, Dist())
    x = torch.from_numpy(np.stack([img for img, _ in __import__("dcgan_dist.data", fromlist=["x"]).read_shards(shards)]))
    with torch.no_grad():
        f = net(x.permute(0, 3, 1, 2)).double()
    assert first["n"] == 96 and torch.allclose(first["sum"], f.sum(0)) and torch.allclose(first["outer"], f.T @ f)
    assert torch.equal(first["kid"], f[:50].float())               # the first 50 images in stored order
    calls = []
    real = metrics._reference_stats
    monkeypatch.setattr(metrics, "_reference_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = reference(net, shards, m, 50, cache, Dist())
    assert not calls and all(torch.equal(first[k], again[k]) for k in first)          # reused
    reference(net, shards, m, 60, cache, Dist())                                       # another count
    net.key = "random-b"
    reference(net, shards, m, 50, cache, Dist())                                       # another extractor
    m2 = write_indexed_shards(tmp_path / "other", 96, resolution=32, channels=1, shard_size=32, chunk_size=16, seed=1)
    reference(net, tmp_path / "other", m2, 50, cache, Dist())                         # other shards
    assert len(calls) == 3 and len(list(cache.glob("reference-*.safetensors"))) == 4


def test_inception_with_random_weights_of_the_real_architecture(tmp_path):
    weights = write_random_inception(tmp_path / "w.pth")
    net = InceptionFeatures(weights)
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    f = net(x)
    assert f.shape == (3, 2048) and torch.isfinite(f).all()
    assert torch.allclose(f, net(x.expand(-1, 3, -1, -1)))            # grey is repeated to RGB
    assert net.key.startswith("inception-")


def test_missing_or_unsafe_inception_weights_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"eval.inception_weights: .*/nope.pth does not exist; FID/KID need the "
                                        r"2015-12-05 Inception weights \(weights-inception-2015-12-05-6726825d.pth"):
        InceptionFeatures(tmp_path / "nope.pth")

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))
    torch.save({"x": Boom()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="is not a PyTorch weights file holding only tensors"):
        InceptionFeatures(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED").exists()


def test_the_digit_classifier_is_accurate_and_cached(classifier_cache):
    files = list(classifier_cache.glob("classifier-*.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert float(f.metadata()["heldout_accuracy"]) >= 0.9


def test_two_processes_give_the_statistics_of_one(tiny, tmp_path, classifier_cache):
    train(load_config(tiny, [f'runs_dir="{tmp_path}"', "train.max_steps=2"]))
    ckpt = tmp_path / "tiny" / "checkpoints" / "step_00000002"
    results = {}
    for procs in (1, 2):
        cache = tmp_path / f"cache{procs}"
        shutil.copytree(classifier_cache, cache)
        for ref in cache.glob("reference-*"):
            ref.unlink()                                          # computed here, by 1 or 2 processes
        args = ["--checkpoint", ckpt, "--set", "eval.n=300", "--json", tmp_path / f"r{procs}.json",
                "--set", f'eval.cache_dir="{cache}"', "--set", "eval.kid_subsets=1", "--set", "eval.batch_size=64"]
        if procs == 1:
            run_cli("evaluate.py", *args)
        else:
            p = accelerate_launch(ROOT / "tests" / "dist" / "threads_at_exit.py", ROOT / "launch" / "evaluate.py", *args)
            # gloo's threads end with the process group, before the interpreter finalizes (runtime.new_accelerator)
            assert sorted(re.findall(r"gloo threads at exit, rank \d: \[.*?\]", p.stderr)) == [   # lines may interleave
                "gloo threads at exit, rank 0: []", "gloo threads at exit, rank 1: []"]
        results[procs] = json.loads((tmp_path / f"r{procs}.json").read_text())
        (ref,) = cache.glob("reference-*.safetensors")
        with safe_open(str(ref), "pt") as f:
            results[procs]["ref"] = {k: f.get_tensor(k) for k in f.keys()}
    one, two = results[1], results[2]
    assert one["n_fake"] == two["n_fake"] == 300 and one["kid_subset_size"] == 300
    assert torch.equal(one["ref"]["kid"], two["ref"]["kid"]) and int(one["ref"]["n"]) == 1797
    for k in ("sum", "outer"):
        assert torch.allclose(one["ref"][k], two["ref"][k], rtol=1e-12, atol=0)
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6) and two["kid"] == pytest.approx(one["kid"], rel=1e-4)
    assert one["fid"] > 1
    assert len(one["class_fractions"]) == 10 and sum(one["class_fractions"]) == pytest.approx(1)
    assert two["class_fractions"] == pytest.approx(one["class_fractions"])


def test_evaluation_during_training_logs_fid_and_keeps_the_best_checkpoint(tiny, tmp_path, classifier_cache):
    cfg = load_config(tiny, [f'runs_dir="{tmp_path}"', "eval.every=2", "eval.n=64", "eval.batch_size=32",
                             "eval.kid_subset_size=32", "eval.kid_subsets=4", f'eval.cache_dir="{classifier_cache}"',
                             "checkpoint.every=1", "checkpoint.keep=1", "train.max_steps=6"])
    train(cfg)
    run = tmp_path / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fid" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and all(r["fid"] > 0 and "kid" in r for r in evals)
    best = min(evals, key=lambda r: r["fid"])
    assert json.loads((run / "checkpoints" / "best.json").read_text())["step"] == best["step"]
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == sorted({f"step_{best['step']:08d}", "step_00000006"})       # keep=1, plus the best
    state = json.loads((run / "checkpoints" / "step_00000006" / "train_state.json").read_text())
    assert state["best_step"] == best["step"] and state["best_fid"] == pytest.approx(best["fid"])


def test_missing_inception_weights_stop_training_before_the_first_step(tiny, tmp_path, cli):
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", "eval.every=2",
            "--set", 'eval.features="inception"', "--set", f'eval.inception_weights="{tmp_path}/w.pth"', check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        f"error: eval.inception_weights: {tmp_path}/w.pth does not exist")
    assert not (tmp_path / "tiny" / "checkpoints").exists()


def test_a_damaged_cached_reference_is_recomputed_with_a_warning_and_gives_the_same_fid(tiny, tmp_path,
                                                                                         classifier_cache, caplog):
    import struct
    from dcgan_dist.data import load_manifest
    from dcgan_dist.eval import Evaluator
    from dcgan_dist.eval.cache import load as cache_load
    from dcgan_dist.models import build_models
    cache = tmp_path / "cache"
    shutil.copytree(classifier_cache, cache)
    for ref in cache.glob("reference-*"):
        ref.unlink()
    cfg = load_config(tiny, [f'eval.cache_dir="{cache}"', "eval.n=64", "eval.batch_size=32",
                             "eval.kid_subset_size=32", "eval.kid_subsets=2"])
    torch.manual_seed(0)
    g, _ = build_models(cfg)
    before = Evaluator(cfg.eval, cfg.data.shards, load_manifest(cfg.data.shards), Dist())(g)
    (ref,) = cache.glob("reference-*.safetensors")
    good = ref.read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    start = 8 + n + json.loads(good[8:8 + n])["sum"]["data_offsets"][0]
    damaged = bytearray(good)
    damaged[start + 7] ^= 0x40                                  # an exponent bit of sum[0]: a wild FID if used
    ref.write_bytes(bytes(damaged))
    after = Evaluator(cfg.eval, cfg.data.shards, load_manifest(cfg.data.shards), Dist())(g)
    assert f"evaluation cache file {ref} is damaged (ValueError: differs from its checksum" in caplog.text
    from safetensors.torch import load as from_bytes
    again, expected = cache_load(ref)[0], from_bytes(good)
    assert all(torch.equal(again[k], expected[k]) for k in expected)   # computed again, the same tensors
    assert after["fid"] == before["fid"] and after["kid"] == before["kid"] and before["fid"] > 0


def test_cache_entries_truncated_unchecked_or_altered_are_refused_and_an_unwritable_cache_is_one_line(tmp_path,
                                                                                                     caplog, cli, tiny):
    from dcgan_dist.eval import cache
    path = tmp_path / "c" / "entry.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3), "n": torch.tensor(7)}
    cache.save(path, tensors, {"extractor": "x"})
    loaded, meta = cache.load(path)
    assert torch.equal(loaded["a"], tensors["a"]) and int(loaded["n"]) == 7 and meta == {"extractor": "x"}
    good = path.read_bytes()
    for name, blob in (("truncated", good[:-5]), ("renamed tensor", good.replace(b'"a"', b'"b"')),
                       ("altered metadata", good.replace(b'"x"', b'"y"'))):
        path.write_bytes(blob)
        assert cache.load(path) is None, name
    from safetensors.torch import save_file
    save_file(tensors, str(path))                               # an entry written before checksums
    assert cache.load(path) is None
    assert caplog.text.count(f"evaluation cache file {path} is damaged") == 4
    assert "no checksum (written by an older version)" in caplog.text
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=rf"eval.cache_dir: {tmp_path / 'file'} is not a writable folder"):
        cache.check_writable(tmp_path / "file")
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", "eval.every=2",
            "--set", f'eval.cache_dir="{tmp_path / "file"}"', check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert p.stderr.startswith(f"error: eval.cache_dir: {tmp_path / 'file'} is not a writable folder")


def test_the_digit_classifier_does_not_depend_on_the_thread_count(tiny, tmp_path):
    """torchrun runs a rank with OMP_NUM_THREADS=1, a plain process with every core: whoever fills the cache
    first, the classifier (bitwise) is the same. 5 training steps already differ with the thread count."""
    import os
    import subprocess
    import sys
    from safetensors.torch import load_file
    shards = load_config(tiny).data.shards
    code = ("import sys, torch; from pathlib import Path; from dcgan_dist.data import load_manifest; "
            "from dcgan_dist.eval import features; features.CLASSIFIER_RECIPE['steps'] = 5; "
            "threads = torch.get_num_threads(); s = Path(sys.argv[1]); "
            "features.classifier(s, load_manifest(s), Path(sys.argv[2]), torch.device('cpu')); "
            "print(threads, torch.get_num_threads())")
    weights = {}
    for threads in ("1", "2"):
        p = subprocess.run([sys.executable, "-c", code, str(shards), str(tmp_path / threads)], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": threads}, check=True)
        assert p.stdout.split() == [threads, threads]               # the process's thread count is restored
        (f,) = (tmp_path / threads).glob("classifier-*.safetensors")
        weights[threads] = (f.name, load_file(f))
    (name1, one), (name2, two) = weights["1"], weights["2"]
    assert name1 == name2 and one.keys() == two.keys() and len(one) == 9
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_precision_and_recall_in_pixel_space_on_known_sets():
    from dcgan_dist.eval.native import NativePixels, precision_recall, std_ratio
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(500, 64, generator=gen)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = real + 10                                                   # every sample far from every real one
    assert precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:5].repeat(100, 1)                               # mode collapse: precise, no recall
    p, r = precision_recall(real, collapsed + 1e-6)
    assert p == 1.0 and r < 0.1
    assert abs(std_ratio(real, real * 0.5 + 0.25) - 0.5) < 1e-9
    x = torch.arange(32 * 32, dtype=torch.uint8).view(1, 1, 32, 32).expand(2, 1, 32, 32)
    f = NativePixels(8, 1)(x)
    assert f.shape == (2, 64) and torch.allclose(f[0, 0], x[0, 0, :4, :4].float().mean() / 255)
