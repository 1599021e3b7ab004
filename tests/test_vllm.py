"""vLLM rollouts (hhh.engines.VLLMRollouts). The first two tests run only where the vllm package and a CUDA GPU
are present (skipped elsewhere, CI included; on a lent GPU machine: `pip install vllm` in a venv, then
`python -m pytest -q tests/test_vllm.py`); the last runs everywhere, with a stand-in for vLLM's LLM class."""

import pytest
import torch

from hhh.engines import vllm_unavailable

on_gpu = pytest.mark.skipif(vllm_unavailable() is not None, reason=f"vLLM cannot run here: {vllm_unavailable()}")

PROMPTS = ["Tell me a story", "hi", "Why is the sky blue?", "Name a colour"]


@pytest.fixture(scope="module")
def tiny_folder(tokenizer, tmp_path_factory):
    """A tiny random Llama saved as an HF folder, the base model vLLM loads."""
    from hhh.models import tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm(tokenizer, layers=4, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _perturb(policy, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@on_gpu
def test_vllm_samples_with_the_policy_adapter_of_each_step(tokenizer, tiny_folder):
    """vLLM's log-probs of its own tokens equal the training model's (temperature 1, fp32) for the adapter as it
    is at that step: after the adapter changes, the next step samples from the changed one."""
    from hhh.config import GRPOConfig
    from hhh.engines import VLLMRollouts
    from hhh.models import load_causal_lm
    from hhh.models.policy import build_policy

    config = GRPOConfig(model=str(tiny_folder), rollout_engine="vllm", temperature=1.0, max_new_tokens=16,
                        lora_r=8, lora_layers=2, micro_batch_size=4, vllm_gpu_memory=0.2)
    policy = build_policy(load_causal_lm(str(tiny_folder), device="cuda"), config.lora(), seed=0)
    engine = VLLMRollouts(config, policy, tokenizer)
    for step in range(2):
        _perturb(policy, step)  # a different adapter each step
        r = engine.sample(PROMPTS * 2, step, torch.Generator().manual_seed(step))
        mask = r.response_mask.bool()
        assert r.response_ids.shape[0] == 8 and mask.sum() > 8
        assert r.logprobs_t1 is not None
        torch.testing.assert_close(r.logprobs_t1[mask], r.logprobs[mask], rtol=0, atol=2e-3)
        ends_with_eos = r.response_ids.gather(1, (r.lengths - 1)[:, None]).squeeze(1) == tokenizer.eos_token_id
        assert torch.equal(r.ended.cpu(), ends_with_eos.cpu())
    again = engine.sample(PROMPTS * 2, 1, torch.Generator().manual_seed(1))
    assert torch.equal(again.response_ids, r.response_ids)  # the same step's seeds draw the same tokens


@on_gpu
def test_grpo_runs_with_vllm_rollouts(tokenizer, tiny_folder, tmp_path):
    from hhh.config import GRPOConfig
    from hhh.models import load_causal_lm
    from hhh.runs import RunDir
    from hhh.train.grpo import train

    config = GRPOConfig(model=str(tiny_folder), rollout_engine="vllm", steps=2, prompts_per_step=4, group_size=4,
                        minibatch_size=8, micro_batch_size=8, max_new_tokens=8, lora_r=8, lora_layers=2,
                        reward="length:8", second_scorer="length:8", val_prompts=0, vllm_gpu_memory=0.2,
                        out=str(tmp_path / "run"), device="cuda")
    run = RunDir.create("grpo", config, config.out)
    train(config, run, base=load_causal_lm(str(tiny_folder), device="cuda"), tokenizer=tokenizer)
    metrics = run.metrics()
    assert len(metrics) == 2 and all(m["time/step_s"] > 0 for m in metrics)


class _FakeLLM:
    """Stands in for vllm.LLM where vLLM cannot run (CPU): returns scripted completions and records what hhh
    handed it, so the glue around the engine (adapter hand-over, token ids -> Rollout) runs in every CI."""

    script: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def generate(self, prompts, params, *, use_tqdm, lora_request):
        from types import SimpleNamespace as NS

        self.calls.append((prompts, params, lora_request))
        return [NS(outputs=[NS(token_ids=ids, finish_reason=why, logprobs=[{t: NS(logprob=-0.5)} for t in ids])])
                for ids, why in self.script]


def fake_vllm(monkeypatch):
    import sys
    from types import ModuleType, SimpleNamespace

    vllm, lora, request = ModuleType("vllm"), ModuleType("vllm.lora"), ModuleType("vllm.lora.request")
    vllm.LLM, vllm.SamplingParams = _FakeLLM, SimpleNamespace
    request.LoRARequest = lambda name, int_id, path: SimpleNamespace(name=name, int_id=int_id, path=path)
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)


def test_vllm_glue_hands_over_each_steps_adapter_and_builds_the_rollout(tokenizer, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from hhh.config import GRPOConfig
    from hhh.engines import VLLMRollouts
    from hhh.models import tiny_causal_lm
    from hhh.models.policy import build_policy

    fake_vllm(monkeypatch)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = GRPOConfig(model="bundled:smollm2-135m-instruct", temperature=0.7, max_new_tokens=4, lora_r=4,
                        lora_layers=2, micro_batch_size=2)
    monkeypatch.setattr("hhh.engines.model_folder", lambda spec: "/base")
    policy = build_policy(tiny_causal_lm(tokenizer, layers=4), config.lora(), seed=0)
    engine = VLLMRollouts(config, policy, tokenizer)
    assert engine.llm.kwargs["model"] == "/base" and engine.llm.kwargs["max_lora_rank"] == 8
    # stopped with EOS in token_ids, stopped with it left out, cut at the length limit
    _FakeLLM.script = [([300, 301, eos], "stop"), ([302], "stop"), ([303, 304, 305, 306], "length")]
    ids = []
    for step in range(2):
        _perturb(policy, step)
        r = engine.sample(PROMPTS[:3], step, torch.Generator().manual_seed(step))
        prompts, params, request = engine.llm.calls[-1]
        ids.append(request.int_id)
        saved = load_file(f"{request.path}/adapter_model.safetensors")
        current = {n: p for n, p in policy.named_parameters() if "lora_B.default" in n}
        assert len(saved) == 2 * len(current)
        for n, p in current.items():
            key = next(k for k in saved if k.split("lora_B")[0] in n and "lora_B" in k)
            assert torch.equal(saved[key], p.detach()), key  # vLLM gets the adapter as it is at this step
    assert ids == [1, 2]  # a new id each step: vLLM loads the new weights instead of its cached adapter
    assert not (engine.folder / "v1").exists()  # the last step's adapter is removed
    assert [p["prompt_token_ids"] for p in prompts] == chat_ids(tokenizer, PROMPTS[:3])
    assert len({p.seed for p in params}) == 3 and all(p.stop_token_ids == [eos] for p in params)
    assert r.response_ids.tolist() == [[300, 301, eos, pad], [302, eos, pad, pad], [303, 304, 305, 306]]
    assert r.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert r.ended.tolist() == [True, True, False]
    assert r.logprobs_t1 is not None and r.logprobs_t1.tolist()[1] == [-0.5, 0.0, 0.0, 0.0]
    with torch.no_grad():
        expected = policy(r.tokens, temperature=0.7).logprobs * r.response_mask
    torch.testing.assert_close(r.logprobs, expected)  # the training model's log-probs, not vLLM's
    assert r.texts[2] == tokenizer.decode([303, 304, 305, 306], skip_special_tokens=True).strip()


def chat_ids(tokenizer, prompts):
    from hhh.rollout import chat_prompt_ids

    return chat_prompt_ids(tokenizer, prompts)


def test_vllm_rollout_in_bf16_is_not_recomputed_a_second_time(tokenizer, monkeypatch):
    """In bf16 the critic-free methods recompute the sampler's old log-probs through the training forward; a vLLM
    rollout's log-probs already come from it, so step 3 runs only the reference passes over it."""
    from hhh.config import GRPOConfig
    from hhh.engines import VLLMRollouts
    from hhh.models import tiny_causal_lm
    from hhh.models.policy import Policy, build_policy
    from hhh.train.groups import old_and_reference_logprobs

    fake_vllm(monkeypatch)
    monkeypatch.setattr("hhh.engines.model_folder", lambda spec: "/base")
    eos = tokenizer.eos_token_id
    config = GRPOConfig(model="bundled:smollm2-135m-instruct", max_new_tokens=4, lora_r=4, lora_layers=2,
                        micro_batch_size=2, dtype="bfloat16")
    policy = build_policy(tiny_causal_lm(tokenizer, layers=4).to(torch.bfloat16), config.lora(), seed=0)
    _perturb(policy, 0)
    engine = VLLMRollouts(config, policy, tokenizer)
    _FakeLLM.script = [([300, 301, eos], "stop"), ([302], "stop"), ([303, 304, 305, 306], "length"), ([307], "stop")]
    r = engine.sample(PROMPTS, 0, torch.Generator().manual_seed(0))
    passes = []
    forward = Policy.forward
    monkeypatch.setattr(Policy, "forward", lambda self, *a, **k: passes.append(1) or forward(self, *a, **k))
    with policy.frozen_trunk(r.tokens, micro_batch_size=2):
        old, _ = old_and_reference_logprobs(policy, r, r.tokens, micro_batch_size=2, temperature=config.temperature)
    assert len(passes) == 2  # the reference's two micro-batches, no second policy pass
    assert torch.equal(old, r.logprobs)
