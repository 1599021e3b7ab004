"""scripts/equivalence.py: two snapshots compare equal within tolerance, renames are applied to step logs only, and
any other difference is reported."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "equivalence.py"
spec = importlib.util.spec_from_file_location("equivalence", SCRIPT)
eq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eq)


def snap(tmp_path, name, steps, evals):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "snapshot.json").write_text(json.dumps({"detox": {"steps": steps, "eval_before": evals,
                                                                "eval_after": evals}}))
    return folder


def test_compare_applies_renames_and_tolerance(tmp_path, capsys):
    evals = {"redteam:eval": {"reward/mean": 0.9, "toxicity/mean_ci95": [0.1, 0.2]}}
    old = snap(tmp_path, "old", [{"step": 1, "reward/score": 0.5, "reward/mean": 0.1, "reward/std": 1.0}], evals)
    new = snap(tmp_path, "new", [{"step": 1, "reward/mean": 0.5 + 1e-7, "reward/shaped_mean": 0.1,
                                  "reward/shaped_std": 1.0}], evals)
    assert eq.compare(old, new, eq.RENAMES, 1e-4, 1e-6) == 0  # swapped names, the eval's reward/mean untouched
    assert eq.compare(old, new, [], 1e-4, 1e-6) == 1
    worse = snap(tmp_path, "worse", [{"step": 1, "reward/mean": 0.51, "reward/shaped_mean": 0.1,
                                      "reward/shaped_std": 1.0}], evals)
    capsys.readouterr()
    assert eq.compare(old, worse, eq.RENAMES, 1e-4, 1e-6) == 1
    assert "differs: detox/steps[0]/reward/mean: 0.5 -> 0.51" in capsys.readouterr().out
