"""Pooling token states (B, T, H) into one embedding per sequence (B, H). Pure tensor functions."""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "cls", "eos")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last non-padding position of each row, for right *and* left padding.

    Right padding [1 1 1 0 0] -> 2; left padding [0 0 1 1 1] -> 4. A row with no real token gives 0.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean",
         normalize: bool = False) -> torch.Tensor:
    """Pool hidden states (B, T, H) with `attention_mask` (B, T) into (B, H).

    mode "mean": average of the real tokens (padding excluded); "cls": the first position (BERT's [CLS]; with
    left padding use "eos" or right padding); "eos": the last real token, the usual choice for decoder LMs whose
    input ends with an appended EOS token (the only position that has attended to the whole text).
    normalize: L2-normalise the result (cosine similarity becomes a dot product).
    """
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)                  # (B, T, 1)
        out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif mode == "cls":
        out = hidden[:, 0]
    elif mode == "eos":
        index = last_token_index(attention_mask)
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
    else:
        raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}")
    if normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=-1)
    return out
