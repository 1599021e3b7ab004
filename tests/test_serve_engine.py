"""The continuous-batching engine on a tiny model: every row of a batch, whenever it joined and whoever ran beside
it, gets what the model gives that row alone (checked against one teacher-forced forward pass), seeds hold
across batch company, stop strings and cancellation end rows, and several adapters share one batch."""

import threading
import time

import pytest
import torch

from hhh.serve.engine import Engine, Event, RequestError, SamplingParams


@pytest.fixture(scope="module")
def sharp(tokenizer):
    """A tiny model with peaked next-token distributions: greedy choices are far from ties, so batched and solo
    float rounding cannot flip them."""
    from hhh.models import tiny_causal_lm
    from hhh.models.load import prepare_tokenizer

    model = tiny_causal_lm(tokenizer, layers=2, seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    return model.eval(), prepare_tokenizer(tokenizer)


class Collector:
    def __init__(self, n: int = 1) -> None:
        self.tokens = [[] for _ in range(n)]
        self.logprobs = [[] for _ in range(n)]
        self.top = [[] for _ in range(n)]
        self.text = [""] * n
        self.reason = [None] * n
        self.done = threading.Event()
        self.open = n

    def __call__(self, e: Event) -> None:
        self.tokens[e.index] += e.tokens
        self.logprobs[e.index] += e.logprobs
        self.top[e.index] += e.top
        self.text[e.index] += e.text
        if e.finish_reason is not None:
            self.reason[e.index] = e.finish_reason
            self.open -= 1
            if self.open == 0:
                self.done.set()


def prompt_ids(tok, text: str) -> list[int]:
    from hhh.rollout import chat_prompt_ids

    return chat_prompt_ids(tok, [text])[0]


def teacher_forced(model, prompt: list[int], tokens: list[int], **kwargs) -> torch.Tensor:
    """(T, V) log-probs of the model at each generated position, from one forward pass over prompt + tokens."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1)


def test_rows_joining_a_running_batch_get_what_the_model_gives_them_alone(sharp):
    model, tok = sharp
    engine = Engine(model, tok, max_batch=8, batch_wait=0).start()
    try:
        texts = ["Hi", "How do I cook rice on a stove without burning it?", "Name a colour.", "Say something nice"]
        prompts = [prompt_ids(tok, t) for t in texts]
        params = SamplingParams(max_tokens=12, temperature=0, top_logprobs=3)
        first = Collector()
        engine.submit(prompts[0], params, first)
        while not first.tokens[0]:  # the batch is running: the next ones join it mid-flight
            time.sleep(0.001)
        rest = [Collector() for _ in prompts[1:]]
        for p, c in zip(prompts[1:], rest, strict=True):
            engine.submit(p, params, c)
        for c in [first, *rest]:
            assert c.done.wait(60)
        assert engine.stats.rows_stepped > engine.stats.steps  # some steps really ran several rows
        for p, c in zip(prompts, [first, *rest], strict=True):
            lp = teacher_forced(model, p, c.tokens[0])
            assert c.tokens[0] == lp.argmax(-1).tolist()                       # greedy: the model's own argmax
            chosen = lp.gather(-1, torch.tensor(c.tokens[0])[:, None])[:, 0]
            assert torch.allclose(torch.tensor(c.logprobs[0]), chosen, atol=1e-4)
            best = [[t for t, _ in row] for row in c.top[0]]
            assert best == lp.topk(3).indices.tolist()
            ended = c.tokens[0][-1] == tok.eos_token_id
            assert c.reason[0] == ("stop" if ended else "length")
            assert c.text[0] == tok.decode(c.tokens[0][:-1] if ended else c.tokens[0], skip_special_tokens=True)
    finally:
        engine.stop()


def test_a_seeded_request_samples_the_same_text_alone_and_in_company(tokenizer):
    from hhh.models import tiny_causal_lm
    from hhh.models.load import prepare_tokenizer

    # near-uniform next-token distributions: every draw matters (a float difference would have to land within
    # ~1e-7 of a bucket edge of the inverse CDF to change a token)
    model, tok = tiny_causal_lm(tokenizer, layers=2, seed=1).eval(), prepare_tokenizer(tokenizer)
    engine = Engine(model, tok, max_batch=8, batch_wait=0).start()
    try:
        p = prompt_ids(tok, "Tell me a story")
        params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=2)
        alone = Collector(2)
        engine.submit(p, params, alone)
        assert alone.done.wait(60)
        crowd = [Collector(2) for _ in range(3)]
        engine.submit(prompt_ids(tok, "Other words entirely"), SamplingParams(max_tokens=10, n=2), crowd[0])
        engine.submit(p, params, crowd[1])
        engine.submit(p, SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=8, n=2), crowd[2])
        for c in crowd:
            assert c.done.wait(60)
        assert crowd[1].tokens == alone.tokens                # same seed, same tokens, whatever ran beside it
        assert alone.tokens[0] != alone.tokens[1]             # each choice its own stream
        assert crowd[2].tokens != alone.tokens                # another seed, other tokens
    finally:
        engine.stop()


def test_stop_strings_cancellation_and_refusals(sharp):
    model, tok = sharp
    engine = Engine(model, tok, max_batch=4, batch_wait=0).start()
    try:
        p = prompt_ids(tok, "Hi")
        full = Collector()
        engine.submit(p, SamplingParams(max_tokens=12, temperature=0), full)
        assert full.done.wait(60)
        text = full.text[0]
        stop = text[3:5]
        assert len(text) > 6 and stop
        cut = Collector()
        engine.submit(p, SamplingParams(max_tokens=12, temperature=0, stop=(stop, "never there")), cut)
        assert cut.done.wait(60)
        assert cut.text[0] == text[:text.find(stop)] and cut.reason[0] == "stop"
        # a cancelled job leaves the batch; the one beside it runs on
        long = Collector()
        job = engine.submit(p, SamplingParams(max_tokens=400, temperature=1.0, seed=1), long)
        other = Collector()
        engine.submit(p, SamplingParams(max_tokens=8, temperature=0), other)
        while not long.tokens[0]:
            time.sleep(0.001)
        job.cancel()
        assert long.done.wait(60) and long.reason[0] == "cancelled" and len(long.tokens[0]) < 400
        assert other.done.wait(60) and other.tokens[0] == full.tokens[0][:8]
        assert engine.stats.cancelled == 1
        with pytest.raises(RequestError, match="exceeds the model's context of 512"):
            engine.submit(p, SamplingParams(max_tokens=510), Collector())
        with pytest.raises(RequestError, match="n=5 is more than the server's batch of 4"):
            engine.submit(p, SamplingParams(n=5), Collector())
        with pytest.raises(RequestError, match="no adapter named 'x'"):
            engine.submit(p, SamplingParams(adapter="x"), Collector())
    finally:
        engine.stop()


def test_several_adapters_share_one_batch(sharp, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = sharp
    for i, name in enumerate(["first", "second"]):
        base = type(model)(model.config)
        base.load_state_dict(model.state_dict())
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for n, param in peft.named_parameters():
                if "lora_B" in n:
                    param.normal_(0, 0.5)
        peft.save_pretrained(tmp_path / name)
    base = type(model)(model.config)
    base.load_state_dict(model.state_dict())
    served = PeftModel.from_pretrained(base, tmp_path / "first", adapter_name="a0")
    served.load_adapter(tmp_path / "second", adapter_name="a1")
    served.eval()
    engine = Engine(served, tok, max_batch=8, batch_wait=0, adapters={"first": "a0", "second": "a1"}).start()
    try:
        p = prompt_ids(tok, "How are you today?")
        outs = {name: Collector() for name in (None, "first", "second")}
        for name, c in outs.items():
            engine.submit(p, SamplingParams(max_tokens=10, temperature=0, adapter=name), c)
        for c in outs.values():
            assert c.done.wait(60)
        assert len({tuple(c.tokens[0]) for c in outs.values()}) == 3  # the adapters really differ
        for name, c in outs.items():
            if name is None:
                with served.disable_adapter():
                    lp = teacher_forced(served, p, c.tokens[0])
            else:
                served.set_adapter({"first": "a0", "second": "a1"}[name])
                lp = teacher_forced(served, p, c.tokens[0])
            assert c.tokens[0] == lp.argmax(-1).tolist(), name
    finally:
        engine.stop()


def test_a_failing_step_ends_its_requests_with_error_once_and_the_engine_serves_on(sharp):
    """A forward pass that raises (as an out-of-memory would) mid-generation: every choice of the running requests
    gets exactly one final event, "error"; the next request is served normally."""
    model, tok = sharp
    fail = {"at": None, "calls": 0}

    def hook(*_):
        fail["calls"] += 1
        if fail["at"] is not None and fail["calls"] == fail["at"]:
            raise RuntimeError("injected failure")

    handle = model.register_forward_pre_hook(hook)
    engine = Engine(model, tok, max_batch=8, batch_wait=0).start()
    try:
        finals: list[tuple[str, int, str]] = []
        lock = threading.Lock()

        def collector(name: str, inner: Collector):
            def call(e: Event) -> None:
                if e.finish_reason is not None:
                    with lock:
                        finals.append((name, e.index, e.finish_reason))
                inner(e)
            return call

        fail["calls"], fail["at"] = 0, 4  # the prefill, then a few decode steps, then the failure
        a, b = Collector(2), Collector()
        engine.submit(prompt_ids(tok, "Hi"), SamplingParams(max_tokens=50, n=2, temperature=1.0, seed=1),
                      collector("a", a))
        engine.submit(prompt_ids(tok, "Hello there"), SamplingParams(max_tokens=50, temperature=0), collector("b", b))
        assert a.done.wait(60) and b.done.wait(60)
        time.sleep(0.2)  # a second final event, if any, would arrive now
        assert sorted(finals) == [("a", 0, "error"), ("a", 1, "error"), ("b", 0, "error")]
        assert engine.stats.errors == 1 and engine.running() == 0
        fail["at"] = None
        after = Collector()
        engine.submit(prompt_ids(tok, "Hi"), SamplingParams(max_tokens=5, temperature=0), after)
        assert after.done.wait(60) and after.reason[0] in ("stop", "length") and after.tokens[0]
    finally:
        engine.stop()
        handle.remove()


def test_a_callback_that_raises_cancels_only_its_own_request(sharp):
    """A consumer that fails on an event (its client is gone) must not end the batch for everyone: its request is
    cancelled, the others finish once, normally."""
    model, tok = sharp
    engine = Engine(model, tok, max_batch=8, batch_wait=0).start()
    try:
        short, steady = Collector(), Collector()
        finals: list[tuple[str, str]] = []

        def tracked(name: str, inner: Collector):
            def call(e: Event) -> None:
                if e.finish_reason is not None:
                    finals.append((name, e.finish_reason))
                inner(e)
            return call

        def broken(e: Event) -> None:
            raise ConnectionError("the consumer went away")

        p = prompt_ids(tok, "Hi")
        with engine._wake:  # all three join one batch: submitted while the engine waits for the lock
            engine.submit(p, SamplingParams(max_tokens=1, temperature=0), tracked("short", short))
            bad = engine.submit(p, SamplingParams(max_tokens=20, temperature=0), broken)
            engine.submit(p, SamplingParams(max_tokens=6, temperature=0), tracked("steady", steady))
        assert short.done.wait(60) and steady.done.wait(60)
        time.sleep(0.2)
        assert sorted(finals) == [("short", "length"), ("steady", "length")]
        assert bad.cancelled and engine.stats.errors == 0 and engine.running() == 0
    finally:
        engine.stop()
