"""Knowledge distillation: teacher -> student with any registered KD divergence.

Modes (``onpolicy.mode``):

- ``off``: KD on dataset batches (DistiLLM/AKL/LoCa style), optionally mixed with CE
  (``loss.kd_ratio``: the KD weight; CE gets ``1 - kd_ratio``);
- ``gkd``: a fraction of the batches are answered by the student first (TRL GKD);
- ``gopd``: every batch is a student rollout trained by PPO-clip on G-OPD advantages.

``lora.enabled=true`` trains the student through LoRA adapters (LLM-Neo) and saves the merged
model as a plain checkpoint. The teacher and student must share a tokenizer; embedding rows
beyond the tokenizer's length (vocabulary padding) are ignored, with a note.

    python -m runner recipe=akl_distill
    python -m runner -m recipe=fkl_distill,rkl_distill,skl_distill,srkl_distill,jsd_distill,tvd_distill,akl_distill
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from omegaconf import DictConfig

from recipes.distill import losses  # noqa: F401  (registers the kd_loss entries)
from recipes.distill.objective import KDObjective
from recipes.distill.onpolicy import GKD, GOPD, Sampling
from runner import registry
from runner.config import bounds
from runner.data import build_dataset
from runner.errors import ConfigError
from runner.lm_head import check_plain_head
from runner.lora import LoraConfig, with_lora
from runner.models import check_same_vocab, load_tokenizer, resolve_model_path
from runner.recipe import Blocks, Component, Recipe, RecipeResult, RunContext
from runner.registry import register


@dataclass
class LocaConfig:
    enabled: bool = False
    alpha: float = field(default=0.9, metadata=bounds(0, 1, lo_open=True))


@dataclass
class LossConfig:
    """The recipe's own `loss` keys; the divergence's parameters (mu, beta, ...) sit beside them."""

    name: str = "fkl"
    temperature: float = field(default=1.0, metadata=bounds(0, lo_open=True))
    kd_ratio: float = field(default=1.0, metadata=bounds(0, 1))
    chunk_size: int = field(default=0, metadata=bounds(0))
    topk: int = field(default=0, metadata=bounds(0))
    loca: LocaConfig = field(default_factory=LocaConfig)


@dataclass
class OnPolicyConfig:
    mode: str = field(default="off", metadata=bounds(choices=("off", "gkd", "gopd")))
    student_fraction: float = field(default=0.5, metadata=bounds(0, 1))  # GKD's lambda
    reward_scale: float = field(default=1.25, metadata=bounds(0, lo_open=True))  # G-OPD's lambda (1 = OPD)
    clip_eps: float = field(default=0.2, metadata=bounds(0, 1, lo_open=True))
    max_new_tokens: int = field(default=32, metadata=bounds(1))
    temperature: float = field(default=1.0, metadata=bounds(0, lo_open=True))
    top_p: float = field(default=1.0, metadata=bounds(0, 1, lo_open=True))
    top_k: int = field(default=0, metadata=bounds(0))


@register("recipe", "distill")
class Distill(Recipe):
    roles = ("teacher", "student")
    blocks = {"loss": LossConfig, "onpolicy": OnPolicyConfig, "lora": LoraConfig}
    components = {"loss": (Component("kd_loss", "name"),)}
    data_role = "student"
    baseline_role = "student"

    # ----------------------------------------------------------------------------------------
    def check(self, cfg: DictConfig, blocks: Blocks) -> list[str]:
        problems = []
        if blocks["onpolicy"].mode != "off" and cfg.data.packing:
            problems.append("data.packing: on-policy modes answer each example's prompt, so they need "
                            "data.packing=false")
        if blocks["onpolicy"].mode == "gopd" and blocks["loss"].loca.enabled:
            problems.append("loss.loca.enabled: LoCa needs ground-truth labels; G-OPD trains only on "
                            "student rollouts")
        return problems

    # ----------------------------------------------------------------------------------------
    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        loss_cfg, onpolicy, lora = ctx.blocks["loss"], ctx.blocks["onpolicy"], ctx.blocks["lora"]

        # The tokenizers are compared before any weights are loaded.
        tok_student = load_tokenizer(resolve_model_path(cfg.student), trust_remote_code=cfg.student.trust_remote_code)
        tok_teacher = load_tokenizer(resolve_model_path(cfg.teacher), trust_remote_code=cfg.teacher.trust_remote_code)
        check_same_vocab(tok_teacher, tok_student, "teacher", "student")

        student, tokenizer = ctx.load_model("student")
        teacher, _ = ctx.load_model("teacher")
        teacher.eval().requires_grad_(False)
        vocab_size = self._common_vocab(student, teacher, len(tokenizer), ctx)
        if loss_cfg.chunk_size:
            check_plain_head(student, "student")
            check_plain_head(teacher, "teacher")

        reference = copy.deepcopy(student).eval().requires_grad_(False) if onpolicy.mode == "gopd" else None
        if lora.enabled:
            student = with_lora(student, lora)

        objective = KDObjective(registry.get("kd_loss", loss_cfg.name), ctx.blocks.params["loss"], temperature=loss_cfg.temperature, kd_ratio=loss_cfg.kd_ratio,
                                loca_alpha=loss_cfg.loca.alpha if loss_cfg.loca.enabled else None,
                                topk=loss_cfg.topk, chunk_size=loss_cfg.chunk_size, vocab_size=vocab_size)
        sampling = Sampling(onpolicy.max_new_tokens, onpolicy.temperature, onpolicy.top_p, onpolicy.top_k)
        unwrap = ctx.accelerator.unwrap_model
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        if onpolicy.mode == "gkd":
            loss_fn = GKD(objective, teacher, unwrap, onpolicy.student_fraction, sampling, pad, eos, cfg.train.seed)
        elif onpolicy.mode == "gopd":
            loss_fn = GOPD(teacher, reference, unwrap, onpolicy.reward_scale, onpolicy.clip_eps, sampling, pad, eos)
        else:
            def loss_fn(model, batch, step):
                return objective(model, teacher, batch)

        examples = build_dataset(cfg.data, tokenizer)
        ctx.log.info("distilling %s -> %s with %s (%s) on %d examples", cfg.teacher.path, cfg.student.path,
                     loss_cfg.name, onpolicy.mode, len(examples))
        result = ctx.train(student, examples, loss_fn, pad_id=pad,
                           desc=f"distill[{'gopd' if onpolicy.mode == 'gopd' else loss_cfg.name}]")
        student = ctx.accelerator.unwrap_model(student)
        if lora.enabled:
            student = student.merge_and_unload()  # a plain model: W + (alpha/r) * B @ A
        checkpoint = ctx.save(student, tokenizer) if cfg.save_checkpoint else None
        return RecipeResult(checkpoint=checkpoint, model=student, tokenizer=tokenizer, train=result,
                            extra={"distill": {"loss": loss_cfg.name, "mode": onpolicy.mode, "lora": lora.enabled,
                                               "compared_vocab": vocab_size}})

    @staticmethod
    def _common_vocab(student, teacher, tokenizer_len: int, ctx: RunContext) -> int:
        """Logit rows compared: the tokenizer's length; rows beyond it are padding and are dropped."""
        sizes = {"student": student.get_output_embeddings().weight.shape[0],
                 "teacher": teacher.get_output_embeddings().weight.shape[0]}
        short = {k: v for k, v in sizes.items() if v < tokenizer_len}
        if short:
            raise ConfigError(f"{', '.join(short)}: output layer has fewer rows ({short}) than the tokenizer has "
                              f"tokens ({tokenizer_len}); the checkpoint does not match its tokenizer")
        padded = {k: v for k, v in sizes.items() if v > tokenizer_len}
        if padded:
            ctx.log.info("note: ignoring padded vocabulary rows beyond the tokenizer's %d tokens (%s)", tokenizer_len,
                         ", ".join(f"{k}: {v}" for k, v in padded.items()))
        return tokenizer_len
