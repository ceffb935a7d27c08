"""Text conditioning shared by the transformer layouts: a per-prompt embedding cache, the one-tensor packing
of (sequence, pooled) conditions, and loading frozen text encoders / tokenizers from a model folder.

Why one tensor: the chain, the trajectory record (moved between processes, subset by ``select``) and
classifier-free guidance (``torch.cat([uncond, cond])``) all handle ``cond`` as a single tensor. SD3 and FLUX
condition on a token sequence *and* a pooled vector; :func:`pack_cond` appends the pooled vector as one more
(zero-padded) token, :func:`unpack_cond` takes it back off inside the adapter's model call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn


class PromptCache:
    """Embeddings computed once per prompt (and once per model device): ``get(prompts, encode)`` encodes only
    the prompts it has not seen, in one batch, and returns the rows of every prompt stacked."""

    def __init__(self) -> None:
        self.rows: dict[str, Tensor] = {}

    def clear(self) -> None:
        self.rows.clear()

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, prompts: Sequence[str], encode: Callable[[list[str]], Tensor], device: torch.device) -> Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if missing:
            with torch.no_grad():
                out = encode(missing).float()
            for p, row in zip(missing, out):
                self.rows[p] = row.to(device)
        return torch.stack([self.rows[p].to(device) for p in prompts])


def pack_cond(seq: Tensor, pooled: Tensor) -> Tensor:
    """``(B, L, Ds)`` token embeddings and ``(B, Dp)`` pooled vectors -> one ``(B, L + 1, max(Ds, Dp))`` tensor
    (the pooled vector is the last token; both zero-padded to the wider dimension)."""
    D = max(seq.shape[-1], pooled.shape[-1])
    seq = nn.functional.pad(seq, (0, D - seq.shape[-1]))
    pooled = nn.functional.pad(pooled, (0, D - pooled.shape[-1]))
    return torch.cat([seq, pooled[:, None, :]], dim=1)


def unpack_cond(cond: Tensor, seq_dim: int, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_cond`: ``(tokens (B, L, seq_dim), pooled (B, pooled_dim))``."""
    return cond[:, :-1, :seq_dim], cond[:, -1, :pooled_dim]


def load_text_parts(folder: Path, parts: Sequence[tuple[str, str, str, bool]], dtype: torch.dtype,
                    who: str) -> dict[str, nn.Module | None]:
    """Load frozen ``(attribute, subfolder, transformers class, required)`` parts of ``folder`` (tokenizers
    with ``AutoTokenizer`` when the class is ``"tokenizer"``), in eval mode and ``dtype``; a missing optional
    part (SD3 without T5) is ``None``. Errors name the subfolder."""
    import transformers
    from transformers import AutoTokenizer

    out: dict = {}
    for attr, sub, cls_name, required in parts:
        if not (folder / sub).is_dir():
            if required:
                raise FileNotFoundError(f"{folder / sub}: missing ({who} needs it)")
            out[attr] = None
            continue
        if cls_name == "tokenizer":
            out[attr] = AutoTokenizer.from_pretrained(folder, subfolder=sub)
        else:
            m = getattr(transformers, cls_name).from_pretrained(folder, subfolder=sub, torch_dtype=dtype)
            out[attr] = m.requires_grad_(False).eval()
    return out


def token_ids(tokenizer, prompts: Sequence[str], length: int, mask: bool = False):
    """Token ids padded / truncated to ``length`` (and the attention mask with ``mask``)."""
    t = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                  return_tensors="pt")
    return (t.input_ids, t.attention_mask) if mask else t.input_ids
