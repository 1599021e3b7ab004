"""The one place that generates: batched sampling with per-token log-probs.

Plain ancestral sampling at a temperature, nothing hidden: no top-k/top-p, no repetition penalty,
no minimum length. The log-prob of each sampled token is taken from the same tempered distribution
it was drawn from, so PPO's first ratio is exactly 1 (up to float noise) when training forwards
divide logits by the same temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import TypeVar

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Tokens:
    """Prompt + response token rows: what every log-prob pass reads. `batch[rows]` is a sub-batch that remembers
    where its rows came from (so a cached frozen trunk of the whole batch serves it)."""

    query_ids: Tensor      # (B, Q) left-padded, chat-templated prompt tokens
    query_mask: Tensor     # (B, Q) 1 on real prompt tokens
    response_ids: Tensor   # (B, R) response tokens, right-padded
    response_mask: Tensor  # (B, R) 1 on response tokens (EOS included)
    source: Tokens | None = None  # the batch these rows were taken from
    rows: Tensor | None = None    # (B,) their indices in `source`

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def __getitem__(self, index: slice | Tensor) -> Tokens:
        return sub_batch(self, index)

    def ids(self) -> Tensor:  # (B, Q+R)
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    def mask(self) -> Tensor:  # (B, Q+R)
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    # What a forward pass reads (hhh.models.Policy), the same for PairTokens:
    def attention(self) -> Tensor:  # (B, Q+R) padding mask; the model adds causality
        return self.mask()

    def position_ids(self) -> Tensor:  # (B, Q+R)
        return positions(self.mask())

    def scored(self) -> Tensor:
        """(R,) the positions whose logits predict the response tokens: Q-1 (the prompt's last) to Q+R-2."""
        Q, R = self.query_ids.shape[1], self.response_ids.shape[1]
        return torch.arange(Q - 1, Q + R - 1, device=self.query_ids.device)

    def per_completion(self, values: Tensor) -> Tensor:  # (B,) sums of (B, R) values over each row's response
        return values.sum(-1)

    completions_per_row = 1  # as GroupTokens: one row, one completion

    def unpack(self, values: Tensor) -> Tensor:  # (B, R, ...) already the rows' layout
        return values

    def row_indices(self, rows: Tensor) -> Tensor:
        return rows

    def from_rows(self, values: Tensor) -> Tensor:  # (B, Q+R, ...) per position of the rows: already this layout
        return values


class SharedPrompt:
    """What a forward pass reads of a row that holds a prompt once, then several completions side by side
    (PairTokens, GroupTokens): each completion attends to the prompt and to itself only and continues the prompt's
    positions. A subclass gives `query_ids`, `query_mask` and `completion_masks()`."""

    query_ids: Tensor
    query_mask: Tensor

    def completion_masks(self) -> list[Tensor]:
        raise NotImplementedError

    def attention(self) -> Tensor:  # (b, 1, L, L) bool: shared_prompt_attention
        return shared_prompt_attention(self.query_mask, self.completion_masks())

    def position_ids(self) -> Tensor:  # (b, L): every completion continues from the prompt's length
        return shared_prompt_positions(self.query_mask, self.completion_masks())

    def scored(self) -> Tensor:  # the positions predicting each completion's tokens, completion by completion
        return shared_prompt_scored(self.query_ids.shape[1], [m.shape[1] for m in self.completion_masks()],
                                    self.query_ids.device)


@dataclass(frozen=True, eq=False)
class PairTokens(SharedPrompt):
    """Preference pairs, one row each: the prompt once, then its chosen and its rejected completion. A 4D attention
    mask lets each completion see the prompt and itself only, and both continue the prompt's positions, so every
    log-prob equals that of the two rows prompt + chosen and prompt + rejected (Tokens), and the prompt's tokens go
    through the model once instead of twice. Its `response_ids` are both completions side by
    side, (b, C+R): chosen, then rejected."""

    query_ids: Tensor      # (b, Q) left-padded, chat-templated prompt tokens
    query_mask: Tensor     # (b, Q)
    chosen_ids: Tensor     # (b, C) right-padded, EOS included
    chosen_mask: Tensor    # (b, C)
    rejected_ids: Tensor   # (b, R) right-padded, EOS included
    rejected_mask: Tensor  # (b, R)
    source: PairTokens | None = None  # the batch these pairs were taken from (a cached trunk of it serves them)
    rows: Tensor | None = None        # (b,) their indices in `source`

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def __getitem__(self, index: slice | Tensor) -> PairTokens:
        return sub_batch(self, index)

    @property
    def response_ids(self) -> Tensor:  # (b, C+R)
        return torch.cat([self.chosen_ids, self.rejected_ids], dim=1)

    @property
    def response_mask(self) -> Tensor:  # (b, C+R)
        return torch.cat([self.chosen_mask, self.rejected_mask], dim=1)

    def ids(self) -> Tensor:  # (b, Q+C+R)
        return torch.cat([self.query_ids, self.chosen_ids, self.rejected_ids], dim=1)

    def completion_masks(self) -> list[Tensor]:  # chosen, rejected
        return [self.chosen_mask, self.rejected_mask]

    def per_completion(self, values: Tensor) -> Tensor:
        """(2b,) sums of (b, C+R) `values` over each chosen completion, then each rejected one: the row order of
        the same pairs as plain rows (prompts * 2, chosen + rejected)."""
        C = self.chosen_ids.shape[1]
        return torch.cat([values[:, :C].sum(-1), values[:, C:].sum(-1)])


@dataclass(frozen=True, eq=False)
class GroupTokens(SharedPrompt):
    """The G completions of one prompt (a GRPO/RLOO group) in one row: the prompt once, then completion 1..G, each
    right-padded to the same width R. Through the 4D mask each completion sees the prompt and itself only and
    continues the prompt's positions, so its log-probs are those of its own row prompt + completion (Tokens) while
    the prompt goes through the model once instead of G times. `unpack` turns (b, G*R) per-token values back into
    the (b*G, R) of the rows the groups came from (row g of group p is row p*G + g)."""

    query_ids: Tensor      # (b, Q) left-padded, chat-templated prompt tokens
    query_mask: Tensor     # (b, Q)
    response_ids: Tensor   # (b, G*R) completion k in columns k*R .. (k+1)*R - 1, each right-padded
    response_mask: Tensor  # (b, G*R)
    completions_per_row: int  # G
    source: GroupTokens | None = None  # the batch these groups were taken from (a cached trunk of it serves them)
    rows: Tensor | None = None         # (b,) their indices in `source`

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def __getitem__(self, index: slice | Tensor) -> GroupTokens:
        return sub_batch(self, index)

    def ids(self) -> Tensor:  # (b, Q+G*R)
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    def completion_masks(self) -> list[Tensor]:  # completion 1..G
        return list(self.response_mask.chunk(self.completions_per_row, dim=1))

    def unpack(self, values: Tensor) -> Tensor:  # (b, G*R, ...) -> (b*G, R, ...): the rows' order
        return values.reshape(len(values) * self.completions_per_row, -1, *values.shape[2:])

    def row_indices(self, groups: Tensor) -> Tensor:  # the rows of these groups, in order
        G = self.completions_per_row
        return (groups[:, None] * G + torch.arange(G, device=groups.device)).reshape(-1)

    def per_completion(self, values: Tensor) -> Tensor:  # (b*G,) sums of (b, G*R) values over each completion
        return self.unpack(values).sum(-1)

    def from_rows(self, values: Tensor) -> Tensor:
        """(b*G, Q+R, ...) values per position of the rows the groups came from -> (b, Q+G*R, ...): each group's
        prompt positions from its first row (its rows share the prompt), then its completions' side by side."""
        G, Q = self.completions_per_row, self.query_ids.shape[1]
        b = len(values) // G
        return torch.cat([values[::G, :Q], values[:, Q:].reshape(b, -1, *values.shape[2:])], dim=1)


def sub_batch(batch: _B, index: slice | Tensor) -> _B:
    """`batch[index]` of a token layout (Tokens, PairTokens, GroupTokens): each row tensor indexed, other fields
    kept, and the rows remembered with the batch they first came from (a cached frozen trunk of it serves them)."""
    rows = torch.arange(len(batch))[index]
    taken = {f.name: getattr(batch, f.name)[index] for f in fields(batch)
             if f.name not in ("source", "rows") and isinstance(getattr(batch, f.name), Tensor)}
    if batch.source is None:
        return replace(batch, **taken, source=batch, rows=rows)
    assert batch.rows is not None  # a sub-batch always knows its rows
    return replace(batch, **taken, rows=batch.rows[rows])


def group_tokens(tokens: Tokens, group_size: int) -> GroupTokens:
    """Rows that come in runs of `group_size` with the same prompt (a GRPO/RLOO step's rollout), one row per run."""
    B, Q = tokens.query_ids.shape
    if B % group_size:
        raise ValueError(f"{B} rows are not whole groups of {group_size}")
    grouped = tokens.query_ids.reshape(B // group_size, group_size, Q)
    if not bool((grouped == grouped[:, :1]).all()):
        raise ValueError(f"rows in a group of {group_size} have different prompts")
    return GroupTokens(tokens.query_ids[::group_size], tokens.query_mask[::group_size],
                       tokens.response_ids.reshape(B // group_size, -1), tokens.response_mask.reshape(B // group_size, -1),
                       group_size)


def shared_prompt_attention(query_mask: Tensor, completions: Sequence[Tensor]) -> Tensor:
    """(b, 1, L, L) bool for a row holding a prompt, then completions side by side (PairTokens, GroupTokens): True
    where query position i attends to key j: j <= i, j a real token, and j in the prompt or in i's own completion.
    The diagonal is always on, so a padding position attends to itself rather than to nothing (a softmax over no
    keys is NaN); no real position ever attends to padding."""
    device = query_mask.device
    widths = [query_mask.shape[1]] + [m.shape[1] for m in completions]
    block = torch.cat([torch.full((w,), k) for k, w in enumerate(widths)]).to(device)  # (L,) 0: the prompt
    L = len(block)
    index = torch.arange(L, device=device)
    causal = index[None, :] <= index[:, None]  # (L, L) [i, j]
    same = (block[None, :] == 0) | (block[None, :] == block[:, None])
    real = torch.cat([query_mask, *completions], dim=1).bool()  # (b, L)
    allowed = (causal & same)[None] & real[:, None, :]
    return (allowed | torch.eye(L, dtype=torch.bool, device=device))[:, None]


def shared_prompt_positions(query_mask: Tensor, completions: Sequence[Tensor]) -> Tensor:
    """(b, L) position ids: the prompt's, then each completion continuing from the prompt's length."""
    start = query_mask.sum(-1, keepdim=True)
    return torch.cat([positions(query_mask), *(start + positions(m) for m in completions)], dim=1)


def shared_prompt_scored(prompt_width: int, widths: Sequence[int], device=None) -> Tensor:
    """The positions whose logits predict each completion's tokens, completion by completion: every completion's
    first token is predicted by the prompt's last position, Q - 1; its others by its own positions."""
    parts, start = [], prompt_width
    for w in widths:
        parts.append(torch.cat([torch.tensor([prompt_width - 1]), torch.arange(start, start + w - 1)]))
        start += w
    return torch.cat(parts).to(device)


Batch = Tokens | PairTokens | GroupTokens  # what a log-prob pass reads
_B = TypeVar("_B", Tokens, PairTokens, GroupTokens)


@dataclass(frozen=True)
class Rollout:
    prompts: list  # raw prompts (strings or message lists, hhh.rollout.Prompt), before the chat template
    query_ids: Tensor  # (B, Q) left-padded, chat-templated prompt tokens
    query_mask: Tensor  # (B, Q) 1 on real prompt tokens
    response_ids: Tensor  # (B, R) sampled tokens; pad after EOS
    response_mask: Tensor  # (B, R) 1 up to and including EOS
    logprobs: Tensor  # (B, R) log pi(a_t | s_t) at the sampling temperature; 0 where masked
    ended: Tensor  # (B,) bool, the completion emitted EOS within max_new_tokens
    texts: list[str]  # decoded completions without special tokens
    logprobs_t1: Tensor | None = None  # (B, R) log-probs of the same tokens at temperature 1 (for perplexity)
    prefilled: int = 0  # prompt rows that went through the prefill (fewer than B when a group shared one)
    trainer_logprobs: bool = False  # `logprobs` came from the training forward (another engine sampled), not the cache
    sampler_dtype: torch.dtype = torch.float32  # what the sampler's weights computed in (Policy.sampler)
    # (B, Q+R, H) the hidden states that entered `trunk_layer` at every position while sampling (Policy.frozen_trunk
    # reuses them); each row's last position holds zeros: its token was never fed back, and it predicts nothing scored
    trunk: Tensor | None = None

    @property
    def lengths(self) -> Tensor:  # (B,) completion tokens, EOS included
        return self.response_mask.sum(-1)

    def input_ids(self) -> Tensor:  # (B, Q+R)
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    def attention_mask(self) -> Tensor:  # (B, Q+R)
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @cached_property
    def tokens(self) -> Tokens:
        """The rollout as a token batch: always the same object, so a trunk cached for it (Policy.frozen_trunk)
        serves every later pass over it."""
        return Tokens(self.query_ids, self.query_mask, self.response_ids, self.response_mask)


Prompt = str | list[dict[str, str]]  # a user message, or a whole conversation ({"role", "content"} messages)


def chat_prompt_ids(tokenizer, prompts: Sequence[Prompt], *, chat: bool = True) -> list[list[int]]:
    """Token ids of each prompt in the tokenizer's chat template, ready for the assistant's answer: a string is a
    single user turn; a list of messages is a conversation (e.g. few-shot turns, then the request)."""
    if not chat or tokenizer.chat_template is None:
        return [tokenizer(p if isinstance(p, str) else "\n\n".join(m["content"] for m in p),
                          add_special_tokens=True)["input_ids"] for p in prompts]
    out = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def _last_text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def prompt_response_tokens(tokenizer, prompts: Sequence[Prompt], responses: Sequence[str], max_response_tokens: int,
                           device=None, *, ended: Sequence[bool] | None = None) -> Tokens:
    """Chat-templated prompts (left-padded) + given responses, each cut to max_response_tokens - 1 tokens and
    ended with EOS (right-padded): what the sampler would have produced, for training on fixed text. A response
    with ended[i] False was cut at a length limit: no EOS (a model must not learn to stop where it was cut)."""
    tails = _response_ids(tokenizer, responses, max_response_tokens, ended)
    return tokens_from_ids(chat_prompt_ids(tokenizer, prompts), tails, tokenizer.pad_token_id, device)


def _response_ids(tokenizer, responses: Sequence[str], max_response_tokens: int,
                  ended: Sequence[bool] | None = None) -> list[list[int]]:
    stops = [True] * len(responses) if ended is None else list(ended)
    return [tokenizer(r, add_special_tokens=False)["input_ids"][: max_response_tokens - 1]
            + ([tokenizer.eos_token_id] if stop else []) for r, stop in zip(responses, stops, strict=True)]


def pair_tokens(tokenizer, prompts: Sequence[Prompt], chosen: Sequence[str], rejected: Sequence[str],
                max_response_tokens: int, device=None) -> PairTokens:
    """Preference pairs packed one row each (PairTokens): the same prompt and completion tokens, cut and ended
    alike, as prompt_response_tokens(prompts * 2, chosen + rejected)."""
    pad = tokenizer.pad_token_id
    return PairTokens(*left_pad(chat_prompt_ids(tokenizer, prompts), pad, device),
                      *right_pad(_response_ids(tokenizer, chosen, max_response_tokens), pad, device),
                      *right_pad(_response_ids(tokenizer, rejected, max_response_tokens), pad, device))


def tokens_from_ids(queries: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                    device=None) -> Tokens:
    """A token batch from id lists: queries left-padded, responses right-padded (each response non-empty)."""
    return Tokens(*left_pad(queries, pad_id, device), *right_pad(responses, pad_id, device))


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that ignore left padding: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_positions(width: int, keep: int, device=None) -> Tensor:
    """`logits_to_keep` for the last `keep` of `width` positions, as indices: transformers then gathers those hidden
    states into a contiguous tensor. Passed as a number it slices a strided view, which torch's matmul runs as a bmm
    over B copies of the output layer's matrix when that matrix needs no gradient (a frozen base, a merged copy):
    in bf16 0.8 s per prefill at batch 16 on the bundled model (tests/test_rollout.py, docs/profile-rollout.md)."""
    return torch.arange(width - keep, width, device=device)


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def _cache_argument(model) -> str:
    """The name under which this model's forward takes and returns the KV cache: `cache` since transformers 5.2x
    (where `past_key_values` still works but warns on every call), `past_key_values` before and in models not
    migrated yet."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def sample(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    generator: torch.Generator | None = None,
    chat: bool = True,
    share_prefill: bool = True,
    trunk_layer: torch.nn.Module | None = None,
) -> Rollout:
    """Sample one completion per prompt (repeat prompts for several samples).

    Prompts that come in runs of G equal ones (a GRPO/RLOO group) are prefilled once per run and the KV cache
    repeated G times (`share_prefill`): the same tokens for the same generator as prefilling every row.
    `trunk_layer`: one of the model's decoder layers; the hidden states entering it at every position are kept
    (Rollout.trunk), so that a frozen trunk below it need not be computed again (Policy.frozen_trunk).

    >>> r = sample(model, tok, ["Say hi"], max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    >>> r.response_ids.shape[0], r.texts[0]  # doctest: +SKIP
    """
    with _inputs_of(trunk_layer) as entered:
        r = _sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                    generator=generator, chat=chat, share_prefill=share_prefill)
    if not entered:
        return r
    # the prefill's (rows, Q, H) repeated for a group's rows, every fed token's (B, 1, H), then zeros for the last
    # token, which is never fed back (no position it could influence is scored)
    prefill = entered[0].repeat_interleave(len(r.query_ids) // r.prefilled, dim=0)
    return replace(r, trunk=torch.cat([prefill, *entered[1:], torch.zeros_like(prefill[:, :1])], dim=1))


@contextmanager
def _inputs_of(layer: torch.nn.Module | None):
    """Within: the hidden states entering `layer` at each of its calls, in order (none when `layer` is None)."""
    entered: list[Tensor] = []
    hook = None if layer is None else layer.register_forward_pre_hook(
        lambda module, args, kwargs: entered.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        yield entered
    finally:
        if hook is not None:
            hook.remove()


@torch.no_grad()
def _sample(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float,
            generator: torch.Generator | None, chat: bool, share_prefill: bool) -> Rollout:
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (log-probs of greedy decoding are undefined)")
    if not prompts:
        raise ValueError("no prompts to sample from")
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = chat_prompt_ids(tokenizer, prompts, chat=chat)
    limit = context_length(model)
    for i, s in enumerate(seqs):
        if len(s) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} has {len(s)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"model context of {limit}: {_last_text(prompts[i])[:60]!r}"
            )
    group = _runs_of_equal(seqs) if share_prefill else 1
    query_ids, query_mask = left_pad(seqs[::group], pad_id, device)  # one row per run; its width is the same
    cache_arg = _cache_argument(model)
    out = model(input_ids=query_ids, attention_mask=query_mask, position_ids=positions(query_mask), use_cache=True,
                logits_to_keep=last_positions(query_ids.shape[1], 1, device))
    past, logits = out[cache_arg], out.logits[:, -1]
    prefilled = query_ids.shape[0]
    if group > 1:
        past.batch_repeat_interleave(group)
        logits = logits.repeat_interleave(group, dim=0)
        query_ids, query_mask = query_ids.repeat_interleave(group, dim=0), query_mask.repeat_interleave(group, dim=0)
    batch = query_ids.shape[0]
    attn = query_mask
    pos = positions(attn)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logps, logps_t1, live = [], [], [], []
    for step in range(max_new_tokens):
        logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, V)
        # Inverse-CDF sampling: one uniform per row. Exact, and far cheaper than torch.multinomial
        # or a Gumbel race, which draw a random number per vocabulary entry (49k here).
        cdf = logp_all.exp().cumsum(-1)
        u = torch.rand((batch, 1), generator=generator, device=device) * cdf[:, -1:]
        nxt = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        live.append(~done)
        logps.append(torch.where(done, 0.0, logp_all.gather(-1, nxt[:, None]).squeeze(-1)))
        untempered = logits.float().gather(-1, nxt[:, None]).squeeze(-1) - torch.logsumexp(logits.float(), -1)
        logps_t1.append(torch.where(done, 0.0, untempered))
        tokens.append(nxt)
        done = done | (nxt == eos_id)
        if bool(done.all()) or step == max_new_tokens - 1:  # the last token is never fed back
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{cache_arg: past})
        past, logits = out[cache_arg], out.logits[:, -1]
    response_ids = torch.stack(tokens, 1)
    response_mask = torch.stack(live, 1).long()
    texts = tokenizer.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(response_ids, response_mask, strict=True)], skip_special_tokens=True
    )
    return Rollout(
        prompts=list(prompts),
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=torch.stack(logps, 1),
        ended=done & (response_ids == eos_id).any(-1),
        texts=[t.strip() for t in texts],
        logprobs_t1=torch.stack(logps_t1, 1),
        prefilled=prefilled,
        sampler_dtype=next(model.parameters()).dtype,
    )


def _runs_of_equal(seqs: Sequence[Sequence[int]]) -> int:
    """G > 1 when `seqs` is made of consecutive runs of G equal sequences, else 1."""
    g = 1
    while g < len(seqs) and seqs[g] == seqs[0]:
        g += 1
    if g == 1 or len(seqs) % g or any(seqs[i] != seqs[i - i % g] for i in range(len(seqs))):
        return 1
    return g


def response_logits(model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """(B, R, V) float logits that predict each response token, from one forward pass over prompt + response.

    Only the response positions' logits are computed (`logits_to_keep`), never (B, Q+R, V).
    """
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    R = response_ids.shape[1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                logits_to_keep=last_positions(ids.shape[1], R + 1, ids.device))
    return out.logits[:, :-1].float()  # position t predicts response token t


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, R) log softmax(logits / temperature) at the given tokens."""
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def response_logprobs(
    model, query_ids: Tensor, query_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
    *, temperature: float = 1.0,
) -> Tensor:
    """(B, R) log-probs of the response tokens under `model` at `temperature`; 0 where masked."""
    logits = response_logits(model, query_ids, query_mask, response_ids, response_mask)
    return token_logprobs(logits, response_ids, temperature) * response_mask
