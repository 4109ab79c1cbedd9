"""launch/export.py: a standalone generator folder, loadable with one line, and a clean failure to upload."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcgan_dist.config import load_config
from dcgan_dist.models import Generator, load_generator
from dcgan_dist.train import train


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    runs = tmp_path_factory.mktemp("export-runs")
    train(load_config(tiny, [f'runs_dir="{runs}"', "train.max_steps=4", "log.every=2"]))
    return runs / "tiny" / "checkpoints" / "step_00000004"


def test_export_writes_a_folder_that_loads_in_one_line(checkpoint, tmp_path, cli):
    out = tmp_path / "exported"
    p = cli("export.py", "--checkpoint", checkpoint, "--out", out)
    assert f"exported G_ema of {checkpoint} to {out}" in p.stdout
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png",
                                                      "training_config.toml"]
    assert json.loads((out / "config.json").read_text()) == {"channels": 1, "latent": 16, "ngf": 8, "resolution": 32}
    card = (out / "README.md").read_text()
    assert "library_name: dcgan_dist" in card and "G_ema (the moving average of G) of the run `tiny` at step 4" in card
    assert "At step 4: loss_d" in card and "![samples](samples.png)" in card
    # one line, in a fresh interpreter that never touches the training code's config machinery
    code = ("import sys, torch; from dcgan_dist.models import Generator; g = Generator.from_pretrained(sys.argv[1]); "
            "assert not g.training and 'dcgan_dist.config' not in sys.modules; "
            "torch.save(g(torch.randn(3, g.latent, generator=torch.Generator().manual_seed(1))), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.pt")], check=True, timeout=120)
    g_ema, which, _ = load_generator(checkpoint)
    with torch.no_grad():
        expected = g_ema(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)))
    assert which == "G_ema" and torch.equal(torch.load(tmp_path / "x.pt"), expected)
    p = cli("export.py", "--checkpoint", checkpoint, "--out", out, check=False)
    assert p.returncode == 2 and "already exists; choose another folder or pass --overwrite" in p.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for script, args in (("export.py", ["--out", blocker / "x"]),
                         ("sample.py", ["--out", blocker / "x", "--interpolate", 3])):
        p = cli(script, "--checkpoint", checkpoint, *args, check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("error: ") and str(blocker) in p.stderr
    assert not (tmp_path / "a-file.tmp").exists()


def test_loading_is_strict(checkpoint, tmp_path, cli):
    out = tmp_path / "exported"
    cli("export.py", "--checkpoint", checkpoint, "--out", out, "--raw")
    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["net.0.weight"], load_file(checkpoint / "model.safetensors")["net.0.weight"])
    del weights["net.0.weight"]
    save_file(weights, out / "model.safetensors")
    with pytest.raises(RuntimeError, match="net.0.weight"):
        Generator.from_pretrained(out)


def test_push_to_hub_without_network_is_one_line_and_keeps_the_folder(checkpoint, tmp_path, cli):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                                    # nothing listens there
    out = tmp_path / "exported"
    p = cli("export.py", "--checkpoint", checkpoint, "--out", out, "--push-to-hub", "someone/dcgan-tiny",
            check=False, env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_" + "x" * 34})
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --push-to-hub someone/dcgan-tiny: upload failed (") and "Traceback" not in p.stderr
    assert last.endswith(f"the exported folder {out} is complete: upload it later with "
                         f"`hf upload someone/dcgan-tiny {out}`")
    assert (out / "model.safetensors").is_file() and "someone/dcgan-tiny" in (out / "README.md").read_text()


def test_export_never_deletes_what_it_did_not_create(checkpoint, tmp_path, capsys):
    """A folder named like the old fixed temporary name is the user's; --overwrite of a run folder, of a folder
    holding the checkpoint being exported, or of anything but an earlier export is refused in one line."""
    import importlib.util
    import shutil
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("export_cli", ROOT / "launch" / "export.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    out, mine = tmp_path / "exported", tmp_path / "exported.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]) == 0   # an export: ok
    assert (mine / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "exported.tmp"]   # no temporary left behind
    assert (out / "model.safetensors").is_file() and oct(out.stat().st_mode & 0o777) == oct(0o777 & ~0o022)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {   # readable by others, as the folder
        name: oct(0o666 & ~0o022) for name in export.EXPORTED}
    capsys.readouterr()

    run = tmp_path / "run"
    shutil.copytree(checkpoint.parent.parent, run)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    everything = lambda: sorted(p for p in tmp_path.rglob("*"))             # noqa: E731
    before = everything()
    for target, says in ((run, "holds a training run (checkpoints, metrics.jsonl)"),
                         (checkpoint.parent.parent, f"holds the checkpoint being exported ({checkpoint})"),
                         (checkpoint.parent, "holds the checkpoint being exported"),
                         (checkpoint, "holds the checkpoint being exported"),
                         (other, "not a folder export.py wrote (it holds cat.jpg)")):
        ckpt_files = sorted(p.name for p in checkpoint.iterdir())
        assert export.main(["--checkpoint", str(checkpoint), "--out", str(target), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {target}: {says}") and err.count("\n") == 1, err
        assert sorted(p.name for p in checkpoint.iterdir()) == ckpt_files
    assert everything() == before
