"""W&B mode before training starts: "auto" goes offline when W&B does not answer within seconds, an explicit
"online" that cannot work is one line on every rank (issue 9 §1). Real sockets on 127.0.0.1, no W&B server."""

import http.server
import logging
import socket
import subprocess
import threading
import time

import pytest

from dcgan_dist.errors import UserError
from dcgan_dist.train.tracking import probe, wandb_credentials, wandb_mode
from conftest import env, run_cmd


@pytest.fixture
def blackhole():
    """A port that accepts connections (the kernel's backlog) and never answers: a firewalled route."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                                    # nothing listens: connection refused
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def answering():
    """A server that answers every request with 404, as a W&B server without /healthz would."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                     # no ~/.netrc
    return monkeypatch


def test_probe_answers_refusals_and_silence(answering, closed_port, blackhole):
    assert probe(answering, timeout=2) is None
    t0 = time.time()
    assert "Connection refused" in probe(closed_port, timeout=2)
    assert time.time() - t0 < 1.5
    t0 = time.time()
    reason = probe(blackhole, timeout=1)
    assert "timed out" in reason and 0.9 < time.time() - t0 < 2


def test_credentials_from_the_environment_or_netrc_for_the_servers_host(no_credentials, tmp_path):
    assert not wandb_credentials("https://api.wandb.ai")
    (tmp_path / ".netrc").write_text("machine wandb.example.org login user password k\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_credentials("https://wandb.example.org") and not wandb_credentials("https://api.wandb.ai")
    no_credentials.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials("https://api.wandb.ai")


def test_auto_and_online_decide_before_training(no_credentials, answering, blackhole, caplog):
    assert wandb_mode("auto") == "offline"                       # no credentials: offline, no probe, no warning
    with pytest.raises(UserError, match='log.wandb = "online" but no W&B credentials'):
        wandb_mode("online")
    no_credentials.setenv("WANDB_API_KEY", "x" * 40)
    no_credentials.setenv("WANDB_BASE_URL", answering)
    assert wandb_mode("auto") == wandb_mode("online") == "online"
    no_credentials.setenv("WANDB_BASE_URL", blackhole)
    with caplog.at_level(logging.WARNING):
        t0 = time.time()
        assert wandb_mode("auto", timeout=1) == "offline"
        assert time.time() - t0 < 2
    assert f"credentials found but {blackhole} did not answer" in caplog.text
    assert wandb_mode("auto", main=False) == "online"            # only the main process logs, so only it waits
    with pytest.raises(UserError, match=f'log.wandb = "online" but W&B at {blackhole} did not answer'):
        wandb_mode("online", timeout=1)
    assert wandb_mode("offline") == "offline" and wandb_mode("disabled") == "disabled"


def test_auto_with_credentials_and_no_network_trains_offline_and_names_the_sync_command(tiny, tmp_path, blackhole,
                                                                                        cli):
    t0 = time.time()
    p = cli("train.py", "--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", 'log.wandb="auto"',
            env={"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": blackhole, "WANDB_SILENT": "true"})
    print(f"auto without network: trained offline, {time.time() - t0:.1f}s in all")
    assert f"credentials found but {blackhole} did not answer" in p.stderr
    sync = [line for line in p.stdout.splitlines() if line.startswith("W&B ran offline; upload with: wandb sync ")]
    assert len(sync) == 1 and str(tmp_path / "tiny" / "wandb" / "offline-run-") in sync[0]
    assert "Traceback" not in p.stderr


def test_explicit_online_without_network_is_one_line_on_every_rank_before_training(tiny, tmp_path, blackhole):
    t0 = time.time()
    p = subprocess.run(run_cmd(tiny, f'runs_dir="{tmp_path}"', 'log.wandb="online"'),
                       env={**env(), "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": blackhole},
                       capture_output=True, text=True, timeout=120)
    print(f"explicit online without network: exit {p.returncode} after {time.time() - t0:.1f}s")
    message = f'error: log.wandb = "online" but W&B at {blackhole} did not answer'
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith(message)
    assert p.stderr.count(message) == 1 and "Traceback" not in p.stderr and "FAILED" not in p.stderr
    assert not (tmp_path / "tiny" / "checkpoints").exists()     # nothing started


def test_offline_segments_of_a_resumed_run_share_one_id_and_the_sync_command_names_them_all(tiny, tmp_path, cli):
    """What wandb's own offline tools show of a run stopped and resumed (two job segments, W&B offline)."""
    import glob
    import json
    import sys
    from pathlib import Path

    args = ["--config", tiny, "--set", f'runs_dir="{tmp_path}"', "--set", 'log.wandb="offline"',
            "--set", "checkpoint.every=2"]
    first = cli("train.py", *args, "--set", "train.max_steps=4", env={"WANDB_SILENT": "true"})
    second = cli("train.py", *args, "--set", "train.max_steps=6", env={"WANDB_SILENT": "true"})
    run = tmp_path / "tiny"
    wandb_id = json.loads((run / "checkpoints" / "step_00000006" / "train_state.json").read_text())["wandb_id"]
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(s.name.endswith(f"-{wandb_id}") for s in segments)     # one id, two folders
    assert all((s / f"run-{wandb_id}.wandb").is_file() for s in segments)
    command = f"wandb sync {run / 'wandb'}/offline-run-*-{wandb_id}*"
    assert first.stdout.splitlines()[-2] == second.stdout.splitlines()[-2] == f"W&B ran offline; upload with: {command}"
    assert sorted(glob.glob(command.split(" ", 2)[2])) == [str(s) for s in segments]
    p = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", *map(str, segments)],
                       capture_output=True, text=True, timeout=120)
    listed = [line.split()[-1] for line in (p.stdout + p.stderr).splitlines() if line.strip().endswith(".wandb")]
    assert listed == [str(s / f"run-{wandb_id}.wandb") for s in segments]                   # oldest first
