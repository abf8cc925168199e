"""The fault-injection run in small: kill -9 at random moments (steps, asynchronous saves,
evaluations) and SIGTERM, then the run finishes bit-identical to an uninterrupted one.

`experiments/faults.py` runs the same with 50 kills on the quickstart, every damage kind and the
bad inputs (`experiments/results/faults.md`); damage and bad inputs are tested one by one in
test_checkpoint.py, test_train.py and test_convert.py.
"""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, f"{REPO}/experiments")
import faults  # noqa: E402


def test_three_kills_and_a_sigterm_lose_nothing(tmp_path):
    code = faults.main(["--tiny", "--kills", "3", "--sigterms", "1", "--damages", "none", "--skip-bad-inputs",
                        "--seed", "1", "--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "faults.json").read_text())
    rounds = {r["round"]: r for r in results["rounds"]}
    assert code == 0, results
    assert [a["signal"] for a in rounds["kill -9"]["attempts"]] == ["SIGKILL"] * 3
    assert rounds["SIGTERM"]["attempts"][0]["exit_code"] == 0
    for r in rounds.values():
        assert r["bit_identical"] and r["metrics_once"] and r["final_exit_code"] == 0, r
