"""tools/demo.py end to end, on a tiny budget."""
import json
import subprocess
import sys
from pathlib import Path

from ctxpred.caffe.env import gpu_status
from ctxpred.training.context_run import choose_device

REPO = Path(__file__).resolve().parents[2]


def test_demo_trains_evaluates_and_reports(caffe, tmp_path, photo_folder):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "old.txt").write_text("a previous demo")
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo.py"), "--out", str(out),
         "--images", str(photo_folder), "--heldout", str(photo_folder), "--minutes", "0.2",
         "--max-patches", "40", "--eval-images", "2", "--pairs-per-image", "8"],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("demo.old-*/old.txt")), "the previous demo must be kept aside"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] >= 1
    status = gpu_status()  # the demo uses GPU 0 when usable, else says why not
    assert summary["device"] == choose_device("auto", status)[1]
    assert summary["device"].startswith("GPU 0" if status.usable else "CPU (no usable GPU: ")
    assert f"device: {summary['device']}; batches of < 40 patches" in result.stdout
    for name in ("initial", "trained"):
        assert summary[name]["pairs"] == 16
        assert 0 <= summary[name]["low"] <= summary[name]["accuracy"] <= summary[name]["high"] <= 1
        assert (out / f"confusion_{name}.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| trained |" in report and "| at initialisation |" in report
    assert "training.png" in report and (out / "training.png").exists()
