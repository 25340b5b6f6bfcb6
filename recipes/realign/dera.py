"""Decoding-time realignment (DeRa, Liu et al., arXiv 2402.02992) as one model object.

`DeRa` holds an aligned model and its reference and behaves, for lm-eval's `HFLM` and for anything
else that calls ``model(input_ids).logits`` or ``model.generate(...)``, like a causal LM whose
next-token logits are the fused ``lam * z_aligned + (1 - lam) * z_reference``:

- ``forward`` runs both models on the same inputs and returns the fused logits at every position,
  so log-likelihoods (multiple choice, perplexity) come from the log-softmax of the fused logits;
- ``generate`` decodes token by token, each model with its own KV cache, the same attention mask and
  position ids (left padding counts neither as context nor as positions), and fuses the two
  last-position logits *before* temperature, top-k and top-p, so sampling draws from
  softmax(fused / T) restricted as asked. Greedy decoding takes the fused argmax.

The reference demo fuses inside an HF `LogitsProcessor` with an all-ones attention mask (batch 1); here
a batch with left padding decodes as its rows would one by one (tested). Every token costs one
forward of each model.
"""

from __future__ import annotations

import inspect

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.modeling_outputs import CausalLMOutput

from recipes.distill.realign import fuse_logits

# transformers' `generate` defaults where neither the call nor the aligned model's generation config sets a value
_SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}


class DeRa(torch.nn.Module):
    """The fused model: ``lam`` = 0 is the reference, 1 the aligned model, > 1 extrapolates past it."""

    def __init__(self, aligned, reference, lam: float):
        super().__init__()
        widths = [m.get_output_embeddings().weight.shape[0] for m in (aligned, reference)]
        if widths[0] != widths[1]:
            raise ValueError(f"DeRa: the aligned and reference models have output layers of different widths "
                             f"({widths[0]} vs {widths[1]}); they must share a vocabulary")
        self.aligned, self.reference, self.lam = aligned, reference, float(lam)
        # per model: the name of its KV-cache argument (`cache` since transformers 5.2x, `past_key_values`
        # before) and whether it can compute the last position's logits only, as `generate` asks for
        params = [inspect.signature(m.forward).parameters for m in (aligned, reference)]
        self._cache_arg = ["cache" if "cache" in p else "past_key_values" for p in params]
        self._keep_last = ["logits_to_keep" in p for p in params]

    # what HFLM and the eval stage read from a model: its config (backend, context length), device, dtype
    @property
    def config(self):
        return self.aligned.config

    @property
    def generation_config(self):
        return self.aligned.generation_config

    @property
    def device(self) -> torch.device:
        return self.aligned.device

    @property
    def dtype(self) -> torch.dtype:
        return self.aligned.dtype

    @property
    def name_or_path(self) -> str:
        return f"dera(lam={self.lam}, aligned={self.aligned.name_or_path}, reference={self.reference.name_or_path})"

    def tie_weights(self, *args, **kwargs) -> None:
        self.aligned.tie_weights(*args, **kwargs)
        self.reference.tie_weights(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """The fused logits (fp32) at every position; both models see the same inputs."""
        z_al = self.aligned(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
        z_ref = self.reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
        return CausalLMOutput(logits=fuse_logits(z_al, z_ref, self.lam))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_length: int | None = None, max_new_tokens: int | None = None, stopping_criteria=None,
                 pad_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
                 **unsupported) -> torch.Tensor:
        """The prompts (left-padded) followed by the decoded tokens, as `GenerationMixin.generate`
        returns them: finished rows are filled with `pad_token_id` until every row is done or the
        length limit is reached. Settings the call leaves unset come from the aligned model's
        generation config, then from transformers' defaults. Both models always use their KV caches
        (`use_cache` is accepted for HFLM's sake)."""
        if unsupported:
            raise TypeError(f"DeRa.generate: unsupported generation arguments {sorted(unsupported)}; it takes "
                            "max_length or max_new_tokens, stopping_criteria, pad_token_id, eos_token_id, do_sample, "
                            "temperature, top_k, top_p and generator")
        gen = self.aligned.generation_config
        given = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        s = {k: v if v is not None else getattr(gen, k, None) if getattr(gen, k, None) is not None else _SAMPLING_DEFAULTS[k]
             for k, v in given.items()}
        eos = eos_token_id if eos_token_id is not None else gen.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
        if pad is None:
            pad = int(eos[0]) if len(eos) else 0
        limit = input_ids.shape[1] + max_new_tokens if max_new_tokens is not None else max_length or gen.max_length or 20
        warpers = LogitsProcessorList()
        if s["do_sample"]:  # applied to the fused logits, in transformers' order
            if s["temperature"] != 1.0:
                warpers.append(TemperatureLogitsWarper(s["temperature"]))
            if s["top_k"]:
                warpers.append(TopKLogitsWarper(top_k=s["top_k"]))
            if s["top_p"] < 1.0:
                warpers.append(TopPLogitsWarper(top_p=s["top_p"]))

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # left padding takes no positions
        ids, step_ids = input_ids, input_ids
        caches: list = [None, None]
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        while ids.shape[1] < limit:
            logits = []
            for i, model in enumerate((self.aligned, self.reference)):
                extra = {self._cache_arg[i]: caches[i], **({"logits_to_keep": 1} if self._keep_last[i] else {})}
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
                caches[i] = getattr(out, self._cache_arg[i])
                logits.append(out.logits[:, -1, :])
            scores = warpers(ids, fuse_logits(logits[0], logits[1], self.lam))
            if s["do_sample"]:
                next_ids = torch.multinomial(scores.softmax(-1), num_samples=1, generator=generator).squeeze(1)
            else:
                next_ids = scores.argmax(-1)
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad))
            ids = torch.cat([ids, next_ids[:, None]], dim=-1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            step_ids, positions = next_ids[:, None], positions[:, -1:] + 1
            unfinished &= ~torch.isin(next_ids, eos)
            if stopping_criteria is not None:
                unfinished &= ~stopping_criteria(ids, scores)
            if not unfinished.any():
                break
        return ids
