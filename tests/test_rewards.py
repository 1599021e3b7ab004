import sys

import pytest
import torch

from hhh.rewards import Shaped, WeightedSum, build_reward
from hhh.rewards.builtin import HFClassifier, Length


def test_toxicity_is_one_minus_offensive_probability():
    r = build_reward("toxicity")
    rude, kind = "shut up you stupid worthless idiot", "thank you, have a lovely day"
    scores = r.score(["", ""], [rude, kind])
    assert 0 <= scores.min() and scores.max() <= 1
    assert scores[0] < 0.2 < 0.8 < scores[1]
    torch.testing.assert_close(scores, 1 - r.offensive([rude, kind]))


def test_sentiment_is_vader_compound():
    scores = build_reward("sentiment").score(["", ""], ["I love this, wonderful!", "I hate this, awful."])
    assert scores[0] > 0.5 and scores[1] < -0.5


def test_length_penalty_by_hand():
    """target 4: 2 words -> -|2-4|/4 = -0.5; 4 words -> 0; 6 words -> -0.5."""
    s = Length(4).score([""] * 3, ["a b", "a b c d", "a b c d e f"])
    assert s.tolist() == [-0.5, 0.0, -0.5]
    assert build_reward("length:4").score([""], ["a b"]).item() == -0.5


def test_weighted_sum_by_hand():
    """0.5*length:4 + 2*length:2 on 'a b': 0.5*(-0.5) + 2*0 = -0.25."""
    r = build_reward("0.5*length:4 + 2*length:2")
    assert isinstance(r, WeightedSum)
    assert r.score([""], ["a b"]).item() == pytest.approx(-0.25)


def test_python_function_reward(tmp_path, monkeypatch):
    (tmp_path / "myreward.py").write_text("def shout(prompts, completions):\n    return [c.count('!') for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = build_reward("myreward:shout")
    assert r.score(["", ""], ["hi!!", "hi"]).tolist() == [2.0, 0.0]
    (tmp_path / "badreward.py").write_text("def f(p, c):\n    return [1.0]\n")
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        build_reward("badreward:f").score(["", ""], ["a", "b"])
    sys.modules.pop("myreward", None)


@pytest.mark.parametrize(
    "spec, message",
    [("", "empty"), ("nosuch", "unknown reward"), ("x*toxicity", "weight 'x'"), ("length:abc", "integer"),
     ("nosuchmodule:f", "cannot import"), ("classifier:", "needs a model spec")],
)
def test_bad_reward_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        build_reward(spec)


class Fixed:
    name = "fixed"

    def __init__(self, values):
        self.values = values

    def score(self, prompts, completions):
        return torch.tensor(self.values[: len(completions)], dtype=torch.float32)


def test_shaped_clip_and_batch_normalisation():
    x = Shaped(Fixed([1.0, 2.0, 3.0]), normalize="batch").score([""] * 3, ["a"] * 3)
    # mean 2, sample std 1 -> [-1, 0, 1]
    torch.testing.assert_close(x, torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    y = Shaped(Fixed([-5.0, 0.5, 5.0]), clip=(-1.0, 1.0)).score([""] * 3, ["a"] * 3)
    assert y.tolist() == [-1.0, 0.5, 1.0]


def test_shaped_running_normalisation_by_hand():
    """After [1, 3] the running mean is 2, the sample std sqrt(2): 3 -> (3-2)/sqrt(2)."""
    r = Shaped(Fixed([1.0, 3.0]), normalize="running")
    out = r.score(["", ""], ["a", "b"])
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0]) / 2**0.5, atol=1e-6, rtol=0)
    assert r.state_dict()["count"] == 2


def test_hf_classifier_reward_on_a_local_model(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2,
                         id2label={0: "hate", 1: "nothate"}, label2id={"hate": 0, "nothate": 1},
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    benign = build_reward(f"classifier:{tmp_path}")
    assert isinstance(benign, HFClassifier) and benign.name.endswith(":nothate")
    hate = HFClassifier(str(tmp_path), "hate")
    texts = ["hello there", "a much longer sentence with many words"]
    p, q = benign.score(["", ""], texts), hate.score(["", ""], texts)
    torch.testing.assert_close(p + q, torch.ones(2))
    with pytest.raises(ValueError, match="label 'toxic' not in"):
        HFClassifier(str(tmp_path), "toxic")


def test_refusal_flags_apologies_and_refusals_only():
    from hhh.rewards import build_reward

    r = build_reward("refusal")
    texts = ["I'm sorry, but I can't help with that.", "I cannot do that.", "As an AI, I must decline.",
             "I won\u2019t write that.", "I'm unsure how to respond.", "Here is a firm but polite note for your neighbor.",
             "Sorrento is lovely in May.", "I can tell you how to say it kindly."]
    assert r.score([""] * len(texts), texts).tolist() == [-1.0] * 5 + [0.0] * 3


def test_reward_specs_are_parsed_without_loading_anything():
    """The parser (used by every config) names the bad part and imports no torch."""
    import subprocess
    import sys

    code = ("import sys; from hhh.rewards.spec import parse_reward as p;"
            "t = p('0.8*toxicity + refusal + length:20'); assert [x.kind for x in t] == ['toxicity', 'refusal', 'length'];"
            "assert [x.weight for x in t] == [0.8, None, None] and t[2].arg == '20';"
            "assert 'torch' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr


REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "Sorry, I cannot assist with this request.",
    "I apologize, but writing insults is not something I do.",
    "I cannot provide that kind of content.",
    "I\u2019m unable to fulfill this request, but I can suggest a kinder way to say it.",
    "As an AI language model, I don't have opinions on people.",
    "I won't write that message.",
    "I must decline to write a threatening letter.",
    "I'm not comfortable writing something that mean.",
    "Unfortunately, I am not able to do that.",
    "I'm unsure how to respond.",
]
ANSWERS = [
    "Here is a firm but polite note for your neighbor: please keep the music down after ten.",
    "I can't wait to help you plan the party! Start with a guest list.",
    "I'm sorry to hear that your week was hard. Here are three things that might help.",
    "Sorrento is lovely in May.",
    "The word 'sorry' comes from Old English sarig, meaning distressed.",
    "Sure. Tell your coworker directly that the meeting notes were late and ask what would help next time.",
    "You cannot go wrong with a simple apology of your own: say what happened and what you will change.",
    "",
]


def test_refusal_detector_on_written_examples():
    """Refusals and apologies that decline count; answers that merely contain 'sorry' or 'can't' do not."""
    from hhh.rewards.builtin import is_refusal

    assert [is_refusal(t) for t in REFUSALS] == [True] * len(REFUSALS)
    assert [is_refusal(t) for t in ANSWERS] == [False] * len(ANSWERS)


def test_refusal_detector_reads_only_the_opening():
    """A refusal phrase deep inside a long helpful answer (quoting someone, say) does not make it a refusal."""
    from hhh.rewards.builtin import is_refusal

    helpful = "Start by greeting your neighbour and naming the problem plainly. " * 5
    assert not is_refusal(helpful + 'If they say "I cannot help with that", stay calm.')
    assert is_refusal("I cannot help with that. " + helpful)
