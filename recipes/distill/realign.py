"""Realignment's fused logits (TrRa, arXiv 2506.12704; DeRa, arXiv 2402.02992).

The aligned model with its alignment strength scaled by ``lam`` is approximated per position by the
geometric mixture ``softmax(lam * z_aligned + (1 - lam) * z_reference)``: lam = 0 is the reference,
1 the aligned model, lam > 1 extrapolates past it. TrRa distils a policy toward this target
(`recipes.distill.objective.KDObjective` with a reference model); decoding-time realignment samples
from it directly. Both take the fused logits from here.
"""

from __future__ import annotations

import torch


def fuse_logits(z_aligned: torch.Tensor, z_reference: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * z_aligned + (1 - lam) * z_reference, in fp32, for logits over the same vocabulary.

    Computed as z_ref + lam * (z_al - z_ref), the form of DeRa's reference code; a constant added to
    either model's logits at a position shifts the fused logits by a constant there, so the softmax
    over the vocabulary (the last axis) is unchanged.
    """
    if z_aligned.shape != z_reference.shape:
        raise ValueError(f"fuse_logits: aligned logits {tuple(z_aligned.shape)} and reference logits "
                         f"{tuple(z_reference.shape)} differ in shape; the models must share a vocabulary")
    z_ref = z_reference.float()
    return z_ref + lam * (z_aligned.float() - z_ref)
