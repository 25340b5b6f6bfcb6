"""Multi-token-prediction heads on a causal LM: cascaded DeepSeek-V3 style modules.

Module k (1-based) at position i, as in vLLM's ``deepseek_mtp.py``:

    h'_i  = W_eh [RMSNorm_e(Emb(t_{i+k})); RMSNorm_h(h_i^(k-1))]     (embedding first; 2d -> d, no bias)
    h_i^k = Block_k(h'_i)                                            (one decoder layer of the model's own class)
    p_k,i = softmax(LMHead(FinalNorm(h_i^k)))                        predicts t_{i+k+1}

h^0 is the trunk's last hidden state after its final norm (what the LM head reads and what vLLM
hands its MTP proposer). The embedding, final norm and LM head are the main model's own (shared,
not copied). The embedding at position 0 is zeroed, as vLLM does. A module attends causally over
its own sequence of positions 0..T-k-1 with the trunk's position ids.

`MTPModel` wraps the causal LM and its heads as one module for the training loop; its forward
returns the trunk's and every head's logits. `save_heads` / `load_heads` keep the heads beside a
checkpoint: ``mtp_heads.safetensors`` and ``mtp_heads.json``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runner import atomic
from runner.errors import ConfigError

WEIGHTS = "mtp_heads.safetensors"
CONFIG = "mtp_heads.json"
FORMAT = 1


def _base(lm):
    """The decoder stack (embeddings, layers, final norm, rotary embedding) of a causal LM."""
    return lm.base_model


def check_supported(lm, key: str = "model") -> None:
    """MTP modules reuse the model's decoder-layer class, final norm and rotary embedding; refuse
    models that do not have them, or whose logits are more than the LM head's projection."""
    base = _base(lm)
    missing = [a for a in ("layers", "norm", "rotary_emb") if not hasattr(base, a)]
    if missing:
        raise ConfigError(f"{key}: MTP heads need a llama-style decoder (layers, norm, rotary_emb); "
                          f"{type(lm).__name__} lacks {', '.join(missing)}")
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(lm.config, attr, None) not in (None, 1, 1.0):
            raise ConfigError(f"{key}: the model scales or caps its logits ({attr}); MTP heads compute logits as "
                              "the LM head's plain projection")


class MTPModule(nn.Module):
    """One MTP module: two RMSNorms, the 2d -> d projection and one decoder block."""

    def __init__(self, config, layer_cls, norm_cls):
        super().__init__()
        d = config.hidden_size
        self.enorm = norm_cls(d, eps=config.rms_norm_eps)
        self.hnorm = norm_cls(d, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        # the last trunk layer's index: its attention type (full or sliding) is the one the module copies
        self.block = layer_cls(config, config.num_hidden_layers - 1)
        std = getattr(config, "initializer_range", 0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, emb, h_prev, *, attention_mask, position_ids, position_embeddings):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.block(x, attention_mask=attention_mask, position_ids=position_ids,
                          position_embeddings=position_embeddings)


def new_heads(lm, n: int) -> nn.ModuleList:
    """`n` freshly initialised modules for `lm` (its decoder-layer and norm classes, its config)."""
    check_supported(lm)
    base = _base(lm)
    layer_cls, norm_cls = type(base.layers[0]), type(base.norm)
    ref = next(lm.parameters())
    return nn.ModuleList(MTPModule(lm.config, layer_cls, norm_cls) for _ in range(n)).to(ref.device, ref.dtype)


def extend_heads(heads: nn.ModuleList, n: int) -> nn.ModuleList:
    """The looped extension [R]: heads 1..K kept, head k > K a copy of head ((k-1) mod K) + 1."""
    k = len(heads)
    if n < k:
        raise ConfigError(f"loss.heads: {n} is fewer than the {k} heads loaded from loss.init_heads; "
                          f"give at least {k}")
    return nn.ModuleList([*heads, *(copy.deepcopy(heads[j % k]) for j in range(k, n))])


class MTPModel(nn.Module):
    """A causal LM and its MTP heads as one module (what the training loop trains and DDP wraps)."""

    def __init__(self, lm, heads: nn.ModuleList):
        super().__init__()
        self.lm, self.heads = lm, heads

    # the training loop turns on gradient checkpointing through these
    @property
    def config(self):
        return self.lm.config

    def gradient_checkpointing_enable(self, **kwargs):
        self.lm.gradient_checkpointing_enable(**kwargs)

    # ----------------------------------------------------------------------------------------
    def trunk(self, input_ids, attention_mask=None):
        """(h0 [B, T, d] after the final norm, main logits [B, T, V])."""
        h0 = _base(self.lm)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h0, self.lm.get_output_embeddings()(h0)

    def logits(self, h, *, detach_shared: bool = False):
        """The shared final norm and LM head on a module's output; `detach_shared` reads their weights
        without gradient (so a loss through them leaves the main head untouched)."""
        norm, head = _base(self.lm).norm, self.lm.get_output_embeddings()
        if not detach_shared:
            return head(norm(h))
        norm_p = {k: v.detach() for k, v in norm.named_parameters()}
        head_p = {k: v.detach() for k, v in head.named_parameters()}
        return torch.func.functional_call(head, head_p, (torch.func.functional_call(norm, norm_p, (h,)),))

    def run_module(self, k: int, module: MTPModule, tokens, h_prev, attention_mask=None, *, detach_shared=False):
        """Module at depth k (1-based) over positions 0..L-1, L = h_prev's length: it reads the
        embeddings of tokens[:, k:k+L] and h_prev; returns h^k [B, L, d]."""
        from transformers.masking_utils import create_causal_mask

        length = h_prev.shape[1]
        emb = self.lm.get_input_embeddings()(tokens[:, k:k + length])
        if detach_shared:
            emb = emb.detach()
        emb = torch.cat([torch.zeros_like(emb[:, :1]), emb[:, 1:]], dim=1)  # position 0 zeroed, as vLLM does
        positions = torch.arange(length, device=emb.device).unsqueeze(0)
        mask = None if attention_mask is None else attention_mask[:, k:k + length]
        causal = create_causal_mask(config=self.lm.config, inputs_embeds=emb, attention_mask=mask, cache=None,
                                    position_ids=positions)
        rotary = _base(self.lm).rotary_emb(emb, position_ids=positions)
        return module(emb, h_prev, attention_mask=causal, position_ids=positions, position_embeddings=rotary)

    def forward(self, input_ids, attention_mask=None, *, num_heads: int | None = None, frozen_trunk: bool = False,
                kl_copy: bool = False):
        """Main logits [B, T, V] and, per head k, its logits [B, T-k, V] at positions 0..T-k-1 (position
        i predicts t_{i+k+1}). `kl_copy` also returns each head's logits computed from a detached
        trunk, embedding, final norm and LM head (the student side of the self-distillation term)."""
        if frozen_trunk:
            with torch.no_grad():
                h0, main = self.trunk(input_ids, attention_mask)
        else:
            h0, main = self.trunk(input_ids, attention_mask)
        out = {"main": main, "heads": [], "heads_kl": []}
        t = input_ids.shape[1]
        h, hd = h0, h0.detach()
        for k, module in enumerate(self.heads[:num_heads], 1):
            if t - k < 1:
                break
            h = self.run_module(k, module, input_ids, h[:, : t - k], attention_mask)
            out["heads"].append(self.logits(h))
            if kl_copy:  # the same module on gradient-free shared inputs: only the modules learn from it
                hd = self.run_module(k, module, input_ids, hd[:, : t - k], attention_mask, detach_shared=True)
                out["heads_kl"].append(self.logits(hd, detach_shared=True))
        return out


# --------------------------------------------------------------------------------------------
# Saving and loading


def heads_config(lm, heads: nn.ModuleList, **trained) -> dict:
    return {"format": FORMAT, "num_heads": len(heads), "model_type": lm.config.model_type,
            "hidden_size": lm.config.hidden_size, "vocab_size": lm.get_output_embeddings().weight.shape[0],
            "layer_class": type(_base(lm).layers[0]).__name__, "embedding_first": True,
            "shared": ["embedding", "final_norm", "lm_head"], "trained": trained}


def save_heads(heads: nn.ModuleList, lm, folder: str | Path, **trained) -> Path:
    """Write the heads (``mtp_heads.safetensors``) and their config (``mtp_heads.json``) into `folder`
    atomically; `trained` (the loss settings, steps) goes into the config."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    with atomic.folder(folder) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(heads_config(lm, heads, **trained), indent=2))
    return folder


def read_heads_config(folder: str | Path, key: str = "loss.init_heads") -> dict:
    folder = Path(folder).expanduser()
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ConfigError(f"{key}: {str(folder)!r} holds no MTP heads ({CONFIG} and {WEIGHTS}); give the "
                          "mtp_heads folder of an earlier run")
    try:
        return json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: {folder / CONFIG} is not valid JSON ({exc})") from None


def check_heads_match(cfg: dict, lm, key: str = "loss.init_heads") -> None:
    """The saved heads were made for a model of this shape."""
    want = heads_config(lm, nn.ModuleList())
    diffs = [f"{f} {cfg.get(f)!r} vs the model's {want[f]!r}" for f in ("model_type", "hidden_size", "vocab_size",
                                                                      "layer_class") if cfg.get(f) != want[f]]
    if cfg.get("format") != FORMAT:
        diffs.insert(0, f"format {cfg.get('format')!r} (this code reads {FORMAT})")
    if diffs:
        raise ConfigError(f"{key}: the heads do not fit this model: {'; '.join(diffs)}")


def load_heads(folder: str | Path, lm, key: str = "loss.init_heads") -> nn.ModuleList:
    """The heads saved in `folder` (by `save_heads`), built for `lm` and on its device."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    cfg = read_heads_config(folder, key)
    check_heads_match(cfg, lm, key)
    heads = new_heads(lm, int(cfg["num_heads"]))
    state = load_file(str(folder / WEIGHTS))
    heads.load_state_dict({k: v.to(next(heads.parameters()).dtype) for k, v in state.items()})
    return heads
