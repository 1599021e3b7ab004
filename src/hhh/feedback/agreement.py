"""Agreement between labelers, on the pairs their rankings imply.

The unit is one unordered pair of completions (a < b) of a prompt that two or more labelers ranked; each
labeler's value is +1 (a above b), 0 (tie) or -1 (a below b). Reported:

- percent agreement per labeler pair (share of shared units with the same value),
- Cohen's kappa per labeler pair (scikit-learn), which discounts agreement expected by chance,
- Krippendorff's alpha over all labelers at once (ordinal; `krippendorff` package), which allows any number of
  labelers per unit and missing values.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from hhh.feedback.rankings import outcome


def unit_values(rankings: list[dict[str, Any]]) -> dict[tuple[int, int, int], dict[str, int]]:
    """{(prompt_id, a, b): {labeler: -1 | 0 | +1}} over the pairs that both ranked completions a and b."""
    units: dict[tuple[int, int, int], dict[str, int]] = {}
    for r in rankings:
        ids = sorted(c for tier in r["tiers"] for c in tier)
        for a, b in itertools.combinations(ids, 2):
            units.setdefault((r["prompt_id"], a, b), {})[r["labeler"]] = outcome(r["tiers"], a, b)
    return units


def agreement(rankings: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics over the rankings of human labelers (AI labels are left out)."""
    import numpy as np

    rankings = [r for r in rankings if r.get("role") != "ai"]
    units = {k: v for k, v in unit_values(rankings).items() if len(v) >= 2}
    labelers = sorted({name for v in units.values() for name in v})
    out: dict[str, Any] = {"labelers": len(labelers), "units": len(units), "percent_agreement": None,
                           "krippendorff_alpha": None, "pairs": []}
    if not units:
        return out
    same = total = 0
    for a, b in itertools.combinations(labelers, 2):
        shared = [(v[a], v[b]) for v in units.values() if a in v and b in v]
        if not shared:
            continue
        x, y = zip(*shared, strict=True)
        agree = sum(p == q for p, q in shared)
        same, total = same + agree, total + len(shared)
        out["pairs"].append({"a": a, "b": b, "shared": len(shared), "agreement": agree / len(shared),
                             "cohen_kappa": _kappa(list(x), list(y))})
    out["percent_agreement"] = same / total if total else None
    matrix = np.full((len(labelers), len(units)), np.nan)
    for j, v in enumerate(units.values()):
        for i, name in enumerate(labelers):
            if name in v:
                matrix[i, j] = v[name]
    out["krippendorff_alpha"] = _alpha(matrix)
    return out


def _kappa(x: list[int], y: list[int]) -> float | None:
    from sklearn.metrics import cohen_kappa_score

    if len(set(x) | set(y)) < 2:  # both always gave the same single value: kappa is 0/0
        return None
    value = float(cohen_kappa_score(x, y, labels=[-1, 0, 1]))
    return None if math.isnan(value) else value


def _alpha(matrix) -> float | None:
    import krippendorff
    import numpy as np

    values = matrix[~np.isnan(matrix)]
    if len(set(values.tolist())) < 2:  # a single value everywhere: alpha is undefined
        return None
    return float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal", value_domain=[-1, 0, 1]))
