import pytest

from hhh.feedback.jobs import rank_by_score
from hhh.feedback.rankings import RankingError, check_tiers, outcome, tiers_from_ranks, tiers_to_pairs


def test_a_ranking_of_k_gives_k_choose_2_pairs_and_keeps_ties():
    """[[7], [3, 9], [4]]: 7>3 7>9 7>4 3>4 9>4 ordered, 3=9 a tie; 4*3/2 = 6 pairs."""
    pairs = tiers_to_pairs([[7], [3, 9], [4]])
    assert len(pairs) == 6
    ordered = {(p.better, p.worse) for p in pairs if not p.tie}
    assert ordered == {(7, 3), (7, 9), (7, 4), (3, 4), (9, 4)}
    assert [(p.better, p.worse) for p in pairs if p.tie] == [(3, 9)]


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_pair_count_for_any_k(k):
    assert len(tiers_to_pairs([[i] for i in range(k)])) == k * (k - 1) // 2
    assert all(p.tie for p in tiers_to_pairs([list(range(k))]))


@pytest.mark.parametrize(
    "tiers, message",
    [
        ([[1], [2]], "missing [3]"),
        ([[1], [2, 2], [3]], "repeated [2]"),
        ([[1], [2], [3], [9]], "unknown [9]"),
        ([[1], [], [2, 3]], "tier 1 must be a non-empty"),
        ([[1], ["2"], [3]], "not a completion id"),
        ([], "non-empty list of tiers"),
        ("1,2,3", "non-empty list of tiers"),
    ],
)
def test_bad_rankings_name_what_is_wrong(tiers, message):
    with pytest.raises(RankingError) as e:
        check_tiers(tiers, [1, 2, 3])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_rank_numbers_to_tiers_and_outcomes():
    tiers = tiers_from_ranks({10: 2, 11: 1, 12: 2, 13: 3})
    assert tiers == [[11], [10, 12], [13]]
    assert outcome(tiers, 11, 13) == 1 and outcome(tiers, 13, 11) == -1 and outcome(tiers, 10, 12) == 0


def test_rank_by_score_splits_only_at_gaps_wider_than_the_threshold():
    """Scores 0.9, 0.86, 0.82, 0.1 with threshold 0.05: gaps 0.04, 0.04, 0.72 -> [[1, 2, 3], [4]]: the chain 0.9-0.82
    is one tier, and every ordered pair differs by more than 0.05. Threshold 0.03: every gap splits."""
    assert rank_by_score([1, 2, 3, 4], [0.9, 0.86, 0.82, 0.1], 0.05) == [[1, 2, 3], [4]]
    assert rank_by_score([1, 2, 3, 4], [0.9, 0.86, 0.82, 0.1], 0.03) == [[1], [2], [3], [4]]
    assert rank_by_score([1, 2], [0.5, 0.5], 0.0) == [[1, 2]]
    assert rank_by_score([5, 6, 7], [0.1, 0.3, 0.2]) == [[6], [7], [5]]
