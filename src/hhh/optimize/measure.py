"""What a compressed variant costs and keeps, measured the same way for every variant in one process.

    size       parameters (and non-zero ones), bytes on disk, peak resident memory of a fresh process that loads it
    speed      generated tokens/s at batch 1 and batch 16 (greedy, fixed length, median of 3 after a warm-up)
    fidelity   on the original's own answers to held-out benign prompts: perplexity, KL(original || variant) per
               token, and how often both put the same token first
"""

from __future__ import annotations

import functools
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hhh.rollout import Tokens


def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def parameter_counts(model) -> tuple[int, int]:
    """(parameters, non-zero parameters) over the model's distinct tensors (a tied embedding counts once)."""
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        dense = p.dequantize() if hasattr(p, "dequantize") else p
        try:
            nonzero += int((dense != 0).sum())
        except (RuntimeError, NotImplementedError):  # a quantized tensor subclass without elementwise ops
            nonzero += p.numel()
    return total, nonzero


def peak_memory_mib(folder: str | Path) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh Python process that imports transformers, loads the folder and runs one forward
    pass; and of one that only imports (the baseline), so `model_mib` is what the model itself adds."""
    # VmHWM, not getrusage: the ru_maxrss of a child started from a large process reported that process's size
    # (547-766 MiB for a 16 MiB model, growing with the parent), VmHWM the child's own peak.
    script = ("import re, sys, torch, transformers\n"
              "if sys.argv[1]:\n"
              "    m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map='cpu').eval()\n"
              "    with torch.no_grad():\n"
              "        m(torch.ones(1, 16, dtype=torch.long))\n"
              "status = open('/proc/self/status').read()\n"
              "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)) / 1024)\n")
    peak = _peak_rss_mib(script, str(folder))
    return {"peak_rss_mib": peak, "model_mib": peak - _baseline_mib(script)}


@functools.cache  # the import-only process is the same for every folder this process measures
def _baseline_mib(script: str) -> float:
    return _peak_rss_mib(script, "")


def _peak_rss_mib(script: str, folder: str) -> float:
    done = subprocess.run([sys.executable, "-c", script, folder], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the memory of {folder or 'the import'} failed: "
                           f"{done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


@torch.no_grad()
def tokens_per_second(model, tokenizer, prompts: list[str], *, batch: int, new_tokens: int, repeats: int = 3) -> float:
    """Generated tokens per second, greedy, every row exactly `new_tokens` long."""
    from hhh.rollout import chat_prompt_ids, left_pad

    rows = (prompts * (batch // max(len(prompts), 1) + 1))[:batch]
    ids, mask = left_pad(chat_prompt_ids(tokenizer, rows), tokenizer.pad_token_id)

    def once() -> float:
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    once()  # warm-up: first calls allocate and pick kernels
    return batch * new_tokens / statistics.median(once() for _ in range(repeats))


@dataclass(frozen=True)
class Reference:
    """The original model's answers and its log-probabilities over the vocabulary on them."""
    tokens: list[Tokens]          # batches of (prompt, answer) tokens
    logprobs: list[torch.Tensor]  # per batch (B, R, V) log pi_original( . | prefix), at temperature 1


@torch.no_grad()
def reference(model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int, batch_size: int = 16,
              logprobs: bool = True) -> Reference:
    """The model's sampled answers (T = 0.7, seeded) and, with `logprobs`, its full log-probabilities on them."""
    from hhh.rollout import response_logits, sample

    gen = torch.Generator().manual_seed(seed)
    tokens, kept = [], []
    for i in range(0, len(prompts), batch_size):
        roll = sample(model, tokenizer, prompts[i:i + batch_size], max_new_tokens=max_new_tokens, temperature=0.7,
                      generator=gen)
        t = Tokens(roll.query_ids, roll.query_mask, roll.response_ids, roll.response_mask)
        tokens.append(t)
        if logprobs:
            kept.append(response_logits(model, *_args(t)).log_softmax(-1))
    return Reference(tokens, kept)


def _args(t: Tokens):
    return t.query_ids, t.query_mask, t.response_ids, t.response_mask


@torch.no_grad()
def fidelity(model, ref: Reference) -> dict[str, float]:
    """Perplexity of the original's answers under `model`, KL(original || model) per answer token, top-1 agreement."""
    from hhh.rollout import response_logits

    nll = kl = agree = n = 0.0
    for t, ref_lp in zip(ref.tokens, ref.logprobs, strict=True):
        lp = response_logits(model, *_args(t)).float().log_softmax(-1)  # (B, R, V)
        mask = t.response_mask.float()
        nll -= float((lp.gather(-1, t.response_ids[..., None])[..., 0] * mask).sum())
        kl += float(((ref_lp.exp() * (ref_lp - lp)).sum(-1) * mask).sum())
        agree += float(((lp.argmax(-1) == ref_lp.argmax(-1)).float() * mask).sum())
        n += float(mask.sum())
    return {"perplexity": math.exp(nll / n), "kl_to_original": kl / n, "top1_agreement": agree / n}
