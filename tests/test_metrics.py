"""One metric vocabulary: every name a run logs is described in hhh.metrics.TABLE, and docs/metrics.md is current."""

from pathlib import Path

from hhh import metrics as M


def test_docs_table_is_generated_from_the_module():
    docs = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
    assert docs.read_text() == M.markdown(), "run: python -m hhh.metrics > docs/metrics.md"


def test_names_are_unique_and_directions_known():
    names = [m.name for m in M.TABLE]
    assert len(names) == len(set(names))
    assert all(m.better in ("higher", "lower", "") for m in M.TABLE)
    assert M.undocumented(["reward/mean", "toxicity/mean_ci95", "step", "time/step_s"]) == []
    assert M.undocumented(["reward/score"]) == ["reward/score"]
