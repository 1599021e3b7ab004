import pytest
import torch

from hhh.models import DEFAULT_MODEL, load_tokenizer, tiny_causal_lm


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled model's real tokenizer (converted once into the user cache)."""
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture
def tiny(tokenizer):
    return tiny_causal_lm(tokenizer, seed=0)


def with_eos_bias(model, eos_id: int, bias: float):
    """Give a tiny model's LM head a bias towards EOS so completions end at varied lengths."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eos_id] = bias
    model.lm_head = head
    return model


@pytest.fixture
def tiny_dir(tokenizer, tmp_path_factory):
    """A tiny random model saved as a local HF folder, usable as a model spec."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
