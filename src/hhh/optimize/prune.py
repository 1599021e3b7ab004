"""Unstructured pruning of the decoder's Linear layers to a target sparsity, made permanent (the weights are zeros).

    magnitude   score |W_ij|, the smallest `sparsity` share of each matrix set to zero (the classic baseline)
    Wanda       score |W_ij| * ||X_j||_2 (Sun et al. 2023, eq. 1), X_j the j-th input feature over the calibration
                tokens; the smallest `sparsity` share of each output row (each i) set to zero, as the paper does

Embeddings and the output layer are not pruned (the paper leaves them dense too). Wanda's input norms are
collected here in one pass over the dense model; the paper's reference code prunes layer by layer, feeding each
layer the inputs of the already pruned layers below (a refinement this one-shot version leaves out).
Zeros in a dense matrix save neither bytes nor time without a sparse kernel: the table says so honestly.

>>> model = wanda(model, calibration_ids, sparsity=0.5)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn


def prunable(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The Linear layers inside the decoder blocks (attention and MLP projections)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in f".{name}":
            yield name, module


def _check(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


@torch.no_grad()
def magnitude(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the `sparsity` share of smallest-magnitude weights of each prunable matrix (in place)."""
    _check(sparsity)
    for _, layer in prunable(model):
        w = layer.weight
        k = int(w.numel() * sparsity)
        if k:
            w.view(-1)[w.abs().flatten().argsort(stable=True)[:k]] = 0.0  # exactly k, ties broken by position
    return model


@torch.no_grad()
def input_norms(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input feature j of every prunable layer, over the real (unmasked) tokens of `batches` of
    (input_ids, attention_mask)."""
    sums: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []
    hooks = []

    def hook(name: str):
        def collect(_module, inputs, _output):
            x = inputs[0].detach().float()                      # (B, T, in)
            keep = mask_now[0].to(x.device).bool()              # (B, T)
            sq = (x[keep] ** 2).sum(0)                          # (in,)
            sums[name] = sums.get(name, torch.zeros_like(sq)) + sq
        return collect

    for name, layer in prunable(model):
        hooks.append(layer.register_forward_hook(hook(name)))
    try:
        for ids, mask in batches:
            mask_now[:] = [mask]
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


@torch.no_grad()
def wanda(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], sparsity: float) -> nn.Module:
    """Zero, in each output row of each prunable matrix, the `sparsity` share of weights with the smallest
    |W_ij| * ||X_j|| (in place). `batches`: calibration (input_ids, attention_mask)."""
    _check(sparsity)
    norms = input_norms(model, batches)
    for name, layer in prunable(model):
        w = layer.weight                                        # (out, in)
        k = int(w.shape[1] * sparsity)
        if not k:
            continue
        score = w.abs() * norms[name].to(w.dtype)[None, :]       # (out, in)
        drop = score.argsort(dim=1, stable=True)[:, :k]         # per output row
        w.scatter_(1, drop, 0.0)
    return model


def sparsity_of(model: nn.Module) -> float:
    """Share of zeros over the prunable matrices."""
    zeros = total = 0
    for _, layer in prunable(model):
        zeros += int((layer.weight == 0).sum())
        total += layer.weight.numel()
    return zeros / total if total else 0.0
