"""Where an online step's rollouts come from: hhh's sampler, or vLLM on a GPU.

    rollouts = rollout_engine(config, policy, tokenizer)     # once, before the first step
    r = rollouts(prompts, step, generator)                    # every step: a Rollout from the current policy

"hhh" (default): `hhh.rollout.sample` on the policy with its adapter merged into copies of the weights, in the
weights' dtype or (`sampler_dtype`) in a bf16 copy of them (Policy.sampler).
"vllm": a vLLM engine holding the base model; every step the policy's adapter is saved and handed to vLLM as a
new LoRA request (a new id, so vLLM loads the new weights; it keeps one adapter on the GPU), vLLM samples, and the
log-probs the losses use are computed again by the training model (vLLM's kernels, precision and batching give
slightly different numbers; the losses must see the policy they differentiate). vLLM's own log-probs of the same
tokens are kept as `logprobs_t1` so that the agreement can be checked (tests/test_vllm.py, on a GPU only).

vLLM is never a dependency of hhh: `--rollout-engine vllm` needs `pip install vllm` and a CUDA GPU, and says so in
one line when either is missing. The vLLM path has been checked against vLLM's API but has not run on a GPU in
this project yet: tests/test_vllm.py is the check to run where one is available.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hhh.rollout import Prompt, Rollout, chat_prompt_ids, sample, tokens_from_ids

Rollouts = Callable[[Sequence[Prompt], int, torch.Generator], Rollout]


def vllm_unavailable() -> str | None:
    """Why vLLM cannot sample here, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install vllm; it is never a dependency of hhh)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def rollout_engine(config, policy, tokenizer) -> Rollouts:
    """The step's sampler for an online job's config (`rollout_engine`, `max_new_tokens`, `temperature`)."""
    if config.rollout_engine == "vllm":
        why = vllm_unavailable()
        if why:
            raise ValueError(f"rollout_engine = 'vllm': {why}")
        engine = VLLMRollouts(config, policy, tokenizer)
        return engine.sample

    dtype = sampler_dtype(config, policy, warn=True)

    def hhh_sampler(prompts: Sequence[Prompt], step: int, generator: torch.Generator) -> Rollout:
        with policy.sampler(dtype) as model:  # the adapter folded into the weights (or a copy of them) while sampling
            # sampling with the training weights computes the frozen trunk on the way: kept for the step's passes
            return sample(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, generator=generator,
                          trunk_layer=policy.trunk_layer if model is policy.lm else None)

    return hhh_sampler


def sampler_dtype(config, policy, *, warn: bool = False) -> torch.dtype | None:
    """The dtype hhh's sampler decodes in for `config.sampler_dtype` (None: the weights' own, Policy.sampler).
    "auto" picks bf16 only for float32 weights on a device with native bf16 matmuls (a CUDA GPU that supports it,
    or a CPU whose oneDNN has avx512_bf16/AMX kernels): on a CPU without them bf16 is emulated, 2-4x slower than
    fp32 (docs/profile-rollout.md); asking for bfloat16 there says so in one line (`warn`)."""
    import sys

    from hhh.models.load import cpu_has_native

    choice = getattr(config, "sampler_dtype", "weights")
    base = policy.lm.get_base_model()
    device = next(base.parameters()).device
    native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
              else device.type == "cpu" and cpu_has_native("bfloat16"))
    if choice == "auto":
        return torch.bfloat16 if base.dtype == torch.float32 and native else None
    if choice == "bfloat16":
        if warn and not native:
            print(f"hhh: sampler_dtype = 'bfloat16' on this {device.type} runs slower than float32 (no native bf16 "
                  "matmuls: no avx512_bf16/AMX); bench/matmul_dtypes.py measures by how much", file=sys.stderr,
                  flush=True)
        return torch.bfloat16
    return None


def model_folder(spec: str) -> str:
    """A folder (or hub id) vLLM can load for an hhh model spec: GGUF files go through hhh's cached conversion."""
    from hhh.models.spec import convert_gguf, resolve

    source = resolve(spec)
    return str(convert_gguf(source.location)) if source.kind in ("bundled", "gguf") else source.location


def lora_rank_slot(r: int) -> int:
    """The smallest LoRA rank vLLM allocates for that is >= r (it accepts only these)."""
    for slot in (8, 16, 32, 64, 128, 256, 320, 512):
        if r <= slot:
            return slot
    raise ValueError(f"lora_r = {r}: vLLM serves LoRA ranks up to 512")


class VLLMRollouts:
    """Rollouts from a vLLM engine that receives the policy's adapter every step."""

    def __init__(self, config, policy, tokenizer) -> None:
        from vllm import LLM

        self.policy, self.tokenizer, self.config = policy, tokenizer, config
        self.folder = Path(tempfile.mkdtemp(prefix="hhh-vllm-"))
        self.version = 0
        lm = policy.lm.get_base_model()
        self.llm = LLM(model=model_folder(config.model), dtype=config.dtype, seed=config.seed,
                       enable_lora=True, max_lora_rank=lora_rank_slot(config.lora_r), max_loras=1,
                       max_model_len=int(getattr(lm.config, "max_position_embeddings", 2048)),
                       gpu_memory_utilization=config.vllm_gpu_memory, enable_prefix_caching=True)

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)

    def sample(self, prompts: Sequence[Prompt], step: int, generator: torch.Generator) -> Rollout:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        self.version += 1
        adapter = self.folder / f"v{self.version}"
        self.policy.save(adapter)  # the weights as they are now: a new id makes vLLM load them
        request = LoRARequest(f"hhh-v{self.version}", self.version, str(adapter))
        shutil.rmtree(self.folder / f"v{self.version - 1}", ignore_errors=True)
        seqs = chat_prompt_ids(self.tokenizer, prompts)
        # One seed per row, drawn from the step's generator: the same step and rank sample the same tokens again
        seeds = torch.randint(0, 2**31 - 1, (len(seqs),), generator=generator, device=generator.device).tolist()
        eos = self.tokenizer.eos_token_id
        params = [SamplingParams(n=1, temperature=self.config.temperature, top_p=1.0, max_tokens=self.config.max_new_tokens,
                                 seed=int(s), logprobs=0, stop_token_ids=[eos], detokenize=False) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False,
                                    lora_request=request)
        return self._rollout(list(prompts), seqs, [o.outputs[0] for o in outputs])

    def _rollout(self, prompts: list, seqs: list[list[int]], outs: list) -> Rollout:
        device = next(self.policy.parameters()).device
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        responses, ended, theirs = [], [], []
        for o in outs:
            ids = list(o.token_ids)
            stopped = o.finish_reason == "stop"
            if stopped and (not ids or ids[-1] != eos):
                ids.append(eos)  # the stop token, when vLLM leaves it out of token_ids
            responses.append(ids or [eos])
            ended.append(stopped)
            lp = [next(iter(d.values())).logprob if d else 0.0 for d in (o.logprobs or [])]
            theirs.append(lp + [0.0] * (len(responses[-1]) - len(lp)))
        tokens = tokens_from_ids(seqs, responses, pad, device)  # prompts left-padded, responses right-padded
        width = tokens.response_ids.shape[1]
        vllm_logprobs = torch.tensor([lp[: len(r)] + [0.0] * (width - len(r)) for lp, r in zip(theirs, responses,
                                                                                              strict=True)])
        with torch.no_grad():  # the training model's log-probs of vLLM's tokens: what the losses compare against
            ours = torch.cat([self.policy(tokens[i : i + self.config.micro_batch_size],
                                          temperature=self.config.temperature).logprobs
                              for i in range(0, len(tokens), self.config.micro_batch_size)])
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        mask = tokens.response_mask
        return Rollout(prompts=prompts, query_ids=tokens.query_ids, query_mask=tokens.query_mask,
                       response_ids=tokens.response_ids, response_mask=mask, logprobs=ours * mask,
                       ended=torch.tensor(ended, device=device), texts=[t.strip() for t in texts],
                       logprobs_t1=vllm_logprobs.to(device) * mask, prefilled=len(seqs), trainer_logprobs=True)
