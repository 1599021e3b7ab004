"""Rankings as tiers, and the pairs they imply. Pure Python: no database, no web.

A ranking of K completions is a list of tiers, best first; completions in one tier are tied:

    [[7], [3, 9], [4]]    7 best, 3 and 9 tied, 4 worst

It implies K(K-1)/2 pairs: (7,3) (7,9) (7,4) (3,4) (9,4) ordered, and (3,9) a tie. Ties stay ties;
no order is invented for them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class RankingError(ValueError):
    """A ranking that does not order exactly the completions of its prompt; str() is one line."""


@dataclass(frozen=True)
class PairOutcome:
    better: int  # completion id ranked higher (for a tie: the smaller id)
    worse: int   # completion id ranked lower (for a tie: the larger id)
    tie: bool


def check_tiers(tiers: Sequence[Sequence[int]], expected: Iterable[int]) -> list[list[int]]:
    """Validate tiers against the completion ids of the prompt; returns them as lists of ints.

    Linear in the size of the ranking, and a ranking far longer than the prompt's K completions is refused before
    its ids are looked at: the cost is bounded by K whatever a client sends. (A few ids too many still get the
    detailed message naming the repeated and unknown ones.)"""
    expected = sorted(expected)
    limit = 2 * len(expected) + 8
    if not isinstance(tiers, Sequence) or isinstance(tiers, str) or not tiers:
        raise RankingError("ranking must be a non-empty list of tiers (lists of completion ids), best first")
    if len(tiers) > limit:
        raise RankingError(f"ranking has {len(tiers)} tiers for {len(expected)} completions")
    out: list[list[int]] = []
    size = 0
    for i, tier in enumerate(tiers):
        if isinstance(tier, str) or not isinstance(tier, Sequence) or not tier:
            raise RankingError(f"ranking tier {i} must be a non-empty list of completion ids")
        size += len(tier)
        if size > limit:
            raise RankingError(f"ranking lists over {limit} ids for the prompt's {len(expected)} completions")
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in tier):
            raise RankingError(f"ranking tier {i} holds something that is not a completion id: {list(tier)[:8]!r}")
        out.append([int(c) for c in tier])
    seen = [c for tier in out for c in tier]
    counts = Counter(seen)
    repeated = sorted(c for c, n in counts.items() if n > 1)
    missing = sorted(set(expected) - counts.keys())
    unknown = sorted(counts.keys() - set(expected))
    if repeated or missing or unknown:
        parts = [f"{name} {ids}" for name, ids in (("repeated", repeated), ("missing", missing), ("unknown", unknown)) if ids]
        raise RankingError(f"ranking must list each of completions {expected} exactly once: " + ", ".join(parts))
    return out


def tiers_to_pairs(tiers: Sequence[Sequence[int]]) -> list[PairOutcome]:
    """Every unordered pair of ranked completions once: ordered across tiers, a tie within one."""
    pairs: list[PairOutcome] = []
    for i, tier in enumerate(tiers):
        ordered = sorted(tier)
        for a_pos, a in enumerate(ordered):
            pairs.extend(PairOutcome(a, b, True) for b in ordered[a_pos + 1:])
            for lower in tiers[i + 1:]:
                pairs.extend(PairOutcome(a, b, False) for b in sorted(lower))
    return pairs


def tiers_from_ranks(ranks: dict[int, int]) -> list[list[int]]:
    """{completion id: rank number, 1 = best} -> tiers; equal rank numbers are ties."""
    by_rank: dict[int, list[int]] = {}
    for cid, rank in ranks.items():
        by_rank.setdefault(rank, []).append(cid)
    return [sorted(by_rank[r]) for r in sorted(by_rank)]


def outcome(tiers: Sequence[Sequence[int]], a: int, b: int) -> int:
    """+1 when a is ranked above b, -1 below, 0 tied (both must be in the ranking)."""
    level = {c: i for i, tier in enumerate(tiers) for c in tier}
    return (level[a] < level[b]) - (level[a] > level[b])
