"""Applications on the aligned model: RAG with citations (rag), chain-of-thought and self-consistency
(reasoning), PAL in an OS-level sandbox (pal, sandbox), ReAct with tools (react, tools), LangChain wrappers
(langchain). Each takes a model from `chat_model`: a local model, a run's adapter on its base, or any
OpenAI-compatible endpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `hhh --help` reads this package (rag's defaults) and must not import torch
    from hhh.cai.critic import Critic


def chat_model(spec: str, *, device: str = "auto", dtype: str = "float32", batch_size: int = 32) -> Critic:
    """`spec` as something that answers conversations: openai:MODEL@URL (an endpoint, hhh serve's included), a
    model spec (bundled:NAME, a folder, a hub id, a .gguf), or a run or adapter folder (the adapter is merged into
    its base model for generation)."""
    from hhh.cai.critic import LocalCritic, build_critic

    if spec.startswith("openai:"):
        return build_critic(spec)
    from hhh.models import load_adapter, load_causal_lm, load_tokenizer
    from hhh.optimize.merge import find_source

    source = find_source(spec)
    if source.adapter is None:
        return build_critic(spec, device=device, dtype=dtype, batch_size=batch_size)
    model = load_adapter(load_causal_lm(source.model, device=device, dtype=dtype), source.adapter).merge_and_unload()
    return LocalCritic(model.eval(), load_tokenizer(source.model), spec, batch_size=batch_size)
