"""tests/gpu/run.sh, the one command a session lent a GPU runs, rehearsed on the CPU so that it cannot rot
between GPU sessions: every section runs (tiny sizes, CUDA-only tests skipped) and the report is complete."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_the_gpu_check_rehearses_every_section_on_the_cpu_and_writes_its_report(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "run.sh")], capture_output=True, text=True, timeout=400,
                       env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sections = [json.loads(line) for line in (tmp_path / "sections.jsonl").read_text().splitlines()]
    assert [s["section"] for s in sections] == ["setup", "pytest", "bench", "e2e", "fashion"]
    assert all(s["rc"] == 0 and not s["timed_out"] for s in sections), sections
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env"]["device"] == "cpu (rehearsal)"
    assert summary["pytest"] and "skipped" in summary["pytest"] and "failed" not in summary["pytest"]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert {(r["mode"], bool(r["images_per_s"])) for r in bench["rows"]} == {("eager", True), ("graph", True),
                                                                             ("textbook", True)}
    assert bench["flops_per_image"]["32"] > 0
    e2e = summary["e2e"]
    assert e2e["exit_code"] == 0 and e2e["steps_logged"] and e2e["images_per_s_median"] > 0
    assert e2e["checkpoint_s"] > 0 and e2e["grid_s"] > 0
    fashion = summary["fashion"]            # the real-data section: trained, measured against the test split
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file() and \
            not os.environ.get("DCGAN_DIST_REQUIRE_FASHION"):
        assert "no Fashion-MNIST IDX files" in fashion["skipped"]
    else:
        assert fashion["train_exit"] == 0 and fashion["epochs"] == 1 and fashion["steps"] == 1024 // 128
        assert fashion["G_ema"]["n_fake"] == 256 and fashion["G_ema"]["n_real"] == 10000
        assert 0 < fashion["floor"]["fid"] < fashion["G_ema"]["fid"] and fashion["fid_over_floor"] > 1
        assert "Fashion-MNIST: 1 epochs" in (tmp_path / "summary.md").read_text()
    assert "# GPU check" in (tmp_path / "summary.md").read_text()
    assert len(list(tmp_path.iterdir())) <= 8               # what the device tool brings back
