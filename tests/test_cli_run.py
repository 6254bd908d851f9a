"""`slimdeploy run` from the command line on the embedded model (synthetic data, a MACs target so that no
timing decides the outcome), then `verify` on a tampered ONNX file: exit 1 with the reason."""

from __future__ import annotations

import json
import re

from slimdeploy.verify import report_dict_schema_errors

from .test_cli import slimdeploy
from .test_export import tamper


def test_run_then_tampered_verify_fails(tmp_path):
    out = tmp_path / "run"
    common = ["--data", "synthetic", "--val-limit", "128"]
    r = slimdeploy("run", "--out", str(out), *common, "--train-limit", "256", "--train-epochs", "1",
                   "--search-epochs", "1", "--retrain-epochs", "1", "--batch-size", "64", "--target-macs", "14M",
                   "--max-drop", "100", "--torch-device", "cpu", "--recovery-steps", "10")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parity" in r.stdout and "PASS" in r.stdout
    assert re.search(r"points (below|above) dense|level with dense", r.stdout)
    d = json.loads((out / "report.json").read_text())
    assert report_dict_schema_errors(d) == []
    assert d["backend"] == "ort-cpu" and d["met_target"] is None and d["passed"]
    spec = json.loads((out / "spec.json").read_text())
    assert spec["meta"]["macs"] <= 14e6
    r = slimdeploy("info", "--run", str(out))
    assert r.returncode == 0 and "slim" in r.stdout

    # a tampered export and an accuracy guard it cannot meet: verify fails loudly, with both reasons
    tamper(out / "model.onnx")
    r = slimdeploy("verify", str(out), *common, "--max-drop", "-100")
    assert r.returncode == 1
    assert "parity failed on ort-cpu" in r.stderr and "more than --max-drop -100" in r.stderr
    assert "Traceback" not in r.stderr
    d = json.loads((out / "report.json").read_text())
    assert d["parity"]["passed"] is False and d["parity"]["max_abs_diff"] > 1e-4 and not d["passed"]
    assert "FAIL" in (out / "report.md").read_text()
