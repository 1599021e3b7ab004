from hhh import metrics as M
from hhh.config import OnlineSettings
from hhh.train.guards import Guards


def step(kl=0.5, entropy=1.5, length=40.0, reward=0.9, second=0.1, repetition=0.0):
    return {M.KL: kl, M.ENTROPY: entropy, M.LENGTH: length, M.REWARD_MEAN: reward, M.SECOND_MEAN: second,
            M.REPETITION_3: repetition}


def test_defaults_come_from_the_settings():
    g = Guards.from_settings(OnlineSettings())
    assert (g.kl_budget, g.kl_budget_action) == (OnlineSettings().kl_budget, "raise_beta")


def test_quiet_when_nothing_drifts():
    g = Guards.from_settings(OnlineSettings())
    assert g.check(1, step()) == ([], None)
    assert g.check(2, step(reward=0.92, second=0.12)) == ([], None)


def test_each_alarm():
    g = Guards(kl_budget=4.0, kl_budget_action="stop", entropy_floor=0.3, length_drift=0.5)
    g.check(1, step())
    assert g.check(2, step(kl=4.5)) == (["kl_budget"], "stop")
    assert g.check(3, step(entropy=0.4))[0] == ["entropy_collapse"]  # 0.4 < 0.3 * 1.5
    assert g.check(4, step(length=19.0))[0] == ["length_drift"]  # below half of 40
    assert g.check(5, step(length=81.0))[0] == ["length_drift"]  # above twice 40
    assert g.check(6, step(repetition=0.6))[0] == ["repetition"]
    # the trained reward rose by 0.08 while the independent judge fell: divergence
    assert g.check(7, step(reward=0.98, second=0.05))[0] == ["reward_divergence"]
    assert [a["alarm"] for a in g.alarms] == ["kl_budget", "entropy_collapse", "length_drift", "length_drift",
                                              "repetition", "reward_divergence"]


def test_state_round_trips():
    g = Guards.from_settings(OnlineSettings())
    g.check(1, step())
    h = Guards.from_settings(OnlineSettings())
    h.load_state_dict(g.state_dict())
    assert h.check(2, step(entropy=0.1)) == g.check(2, step(entropy=0.1))
