"""LoRA adapters (peft) for the training recipes: the `lora` config block and wrapping a model.

After training, ``model.merge_and_unload()`` folds each adapter back in (W + (alpha / r) * B @ A)
and leaves a plain transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from runner.config import bounds


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = field(default=64, metadata=bounds(1))
    alpha: Optional[float] = None  # default 2 * rank (LLM-Neo, Shadow-FT)
    dropout: float = field(default=0.0, metadata=bounds(0, 1))
    targets: str = "all-linear"  # peft target_modules: "all-linear" or a comma-separated list


def with_lora(model, lora):
    """`model` wrapped by peft with trainable adapters as `lora` (a LoraConfig or its DictConfig) says."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.targets if lora.targets == "all-linear" else [t.strip() for t in lora.targets.split(",")]
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.rank,
                            lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
