"""Logits without the ``[batch, seq, vocab]`` tensor: last hidden states and the LM head, by chunks.

A causal LM's logits are ``hidden @ W_head^T (+ b)`` on its last hidden state. Losses that only need
the response tokens can ask the model for hidden states (and the logits of one position only),
select the tokens they need, and project them a chunk at a time, so peak memory holds ``[chunk,
vocab]`` tensors whatever the batch, sequence or vocabulary size. This assumes a plain linear head
(llama, qwen, mistral, ...); `check_plain_head` refuses models that scale or cap their logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runner.errors import ConfigError


def unwrap(model):
    """The model inside a DDP wrapper (which has `.module` and no output embeddings of its own)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model


def last_hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T, H]`` final hidden states (after the last norm), through the (possibly wrapped) model."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                logits_to_keep=1)
    return out.hidden_states[-1]


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = unwrap(model).get_output_embeddings()
    return head.weight, head.bias


def project(hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    return F.linear(hidden, *head)


def token_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log p(target) for each row of ``hidden [N, H]``, computed `chunk_size` rows at a time (fp32)."""
    out = []
    for i in range(0, hidden.shape[0], chunk_size):
        logits = project(hidden[i: i + chunk_size], head).float()
        out.append(-F.cross_entropy(logits, targets[i: i + chunk_size], reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0)


def check_plain_head(model, role: str, key: str = "loss.chunk_size") -> None:
    """Chunked logits recompute the head as a plain projection; refuse models whose head is not one."""
    config = unwrap(model).config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ConfigError(f"{key}: the {role} scales or caps its logits ({attr}); set {key}=0 for this model")
