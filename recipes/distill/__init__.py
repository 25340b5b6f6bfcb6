"""Knowledge distillation: teacher -> student with any registered KD divergence.

Modes (``onpolicy.mode``):

- ``off``: KD on dataset batches (DistiLLM/AKL/LoCa style), optionally mixed with CE
  (``loss.kd_ratio``: the KD weight; CE gets ``1 - kd_ratio``);
- ``gkd``: a fraction of the batches are answered by the student first (TRL GKD);
- ``gopd``: every batch is a student rollout trained by PPO-clip on G-OPD advantages; the reference
  is the student's start, or the ``reference`` model when one is given (reward correction).

``loss.realign.enabled=true`` is TrRa (training-time realignment): on dataset batches the student
(the policy, started at the reference) learns the fused target softmax(lam * z_teacher + (1 - lam) *
z_reference), the teacher being the aligned model and the reference the student's start unless a
``reference`` model is given; ``loss.name`` picks the divergence (fkl: the released code's
KL(p* || pi), rkl: the paper's KL(pi || p*)).

``loss.teacher_cache`` (``off``, ``auto`` or a folder) keeps the teacher's top-k log-probs on the
dataset's response tokens (`recipes.distill.teacher_cache`): the first run computes them, later runs
on the same teacher and data (a sweep over divergences) read them and never run the teacher on
dataset batches. ``auto`` keeps them in the runner's cache and runs the teacher live where a cache
cannot serve (G-OPD rollouts, TrRa); a folder given by name must be usable.

``lora.enabled=true`` trains the student through LoRA adapters (LLM-Neo) and saves the merged
model as a plain checkpoint. The teacher and student must share a tokenizer; embedding rows
beyond the tokenizer's length (vocabulary padding) are ignored, with a note.

    python -m runner recipe=akl_distill
    python -m runner -m recipe=fkl_distill,rkl_distill,skl_distill,srkl_distill,jsd_distill,tvd_distill,akl_distill
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from recipes.distill import losses  # noqa: F401  (registers the kd_loss entries)
from recipes.distill.objective import KDObjective
from recipes.distill.onpolicy import AGGREGATIONS, GKD, GOPD, Sampling
from recipes.distill import teacher_cache
from runner import registry
from runner.cache import cache_dir, checkpoint_fingerprint
from runner.config import bounds, method_block
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
class RealignConfig:
    """TrRa: distil toward softmax(lam * z_teacher + (1 - lam) * z_reference) (arXiv 2506.12704)."""

    enabled: bool = False
    lam: float = 1.5  # the released code's pref_beta default; 0 = the reference, 1 = the aligned model


@dataclass
class LossConfig:
    """The recipe's own `loss` keys; the divergence's parameters (mu, beta, ...) sit beside them."""

    name: str = "fkl"
    temperature: float = field(default=1.0, metadata=bounds(0, lo_open=True))
    kd_ratio: float = field(default=1.0, metadata=bounds(0, 1))
    chunk_size: int = field(default=0, metadata=bounds(0))
    topk: int = field(default=0, metadata=bounds(0))
    loca: LocaConfig = field(default_factory=LocaConfig)
    realign: RealignConfig = field(default_factory=RealignConfig)
    teacher_cache: str = "off"  # off | auto (the runner's cache) | a folder: the teacher's top-k, computed once
    teacher_cache_k: int = field(default=64, metadata=bounds(1))


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
    # [R] verl's token-mean within micro-batches of one sequence amounts to seq_mean_token_mean
    agg: str = field(default="seq_mean_token_mean", metadata=bounds(choices=AGGREGATIONS))


@register("recipe", "distill")
class Distill(Recipe):
    roles = ("teacher", "student")
    optional_roles = ("reference",)  # G-OPD's reward correction, TrRa's reference; else the student's start
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
        if blocks["loss"].realign.enabled and blocks["onpolicy"].mode != "off":
            problems.append(f"loss.realign.enabled: TrRa is teacher-forced on dataset batches; it needs "
                            f"onpolicy.mode=off, not {blocks['onpolicy'].mode!r}")
        problems += self._check_teacher_cache(blocks["loss"], blocks["onpolicy"])
        if cfg.get("reference") is not None and not self._needs_reference(blocks["loss"], blocks["onpolicy"]):
            problems.append("reference: set, but only G-OPD with onpolicy.reward_scale != 1 (onpolicy.mode=gopd; at "
                            "reward_scale 1 the reference drops out of the advantage) and TrRa "
                            "(loss.realign.enabled=true) use a reference model; remove it")
        return problems

    @staticmethod
    def _cache_serves(loss_cfg, onpolicy) -> str | None:
        """Why a teacher cache cannot serve this run (None: it can)."""
        if onpolicy.mode == "gopd":
            return "G-OPD trains only on student rollouts, which no cache holds"
        if loss_cfg.realign.enabled:
            return "TrRa's target fuses the teacher with the reference live"
        return None

    def _check_teacher_cache(self, loss_cfg, onpolicy) -> list[str]:
        where = loss_cfg.teacher_cache
        if where == "off":
            return []
        problems, why_not = [], self._cache_serves(loss_cfg, onpolicy)
        if where != "auto":
            folder = Path(where).expanduser()
            if not where.strip():
                problems.append("loss.teacher_cache: empty; use off, auto or a folder")
            elif folder.exists() and not folder.is_dir():
                problems.append(f"loss.teacher_cache: {where!r} is a file; give a folder (or off, auto)")
            if why_not:
                problems.append(f"loss.teacher_cache: a folder is given, but {why_not}; set loss.teacher_cache=off "
                                f"(auto runs such a job live)")
        if why_not is None and loss_cfg.topk > loss_cfg.teacher_cache_k:
            problems.append(f"loss.topk: {loss_cfg.topk} exceeds loss.teacher_cache_k={loss_cfg.teacher_cache_k}, the "
                            f"tokens the cache keeps; raise loss.teacher_cache_k or lower loss.topk")
        return problems

    def uses(self, cfg: DictConfig) -> set[str]:
        needs = self._needs_reference(method_block(cfg, "loss", LossConfig), method_block(cfg, "onpolicy", OnPolicyConfig))
        return {*self.roles, *(["reference"] if needs else [])}

    @staticmethod
    def _needs_reference(loss_cfg, onpolicy) -> bool:
        return loss_cfg.realign.enabled or (onpolicy.mode == "gopd" and onpolicy.reward_scale != 1.0)

    # ----------------------------------------------------------------------------------------
    def run(self, cfg: DictConfig, ctx: RunContext) -> RecipeResult:
        loss_cfg, onpolicy, lora = ctx.blocks["loss"], ctx.blocks["onpolicy"], ctx.blocks["lora"]

        # The tokenizers are compared before any weights are loaded.
        tok_student = load_tokenizer(resolve_model_path(cfg.student), trust_remote_code=cfg.student.trust_remote_code)
        tok_teacher = load_tokenizer(resolve_model_path(cfg.teacher), trust_remote_code=cfg.teacher.trust_remote_code)
        check_same_vocab(tok_teacher, tok_student, "teacher", "student")
        given_reference = cfg.get("reference") is not None and self._needs_reference(loss_cfg, onpolicy)
        if given_reference:
            tok_reference = load_tokenizer(resolve_model_path(cfg.reference), trust_remote_code=cfg.reference.trust_remote_code)
            check_same_vocab(tok_reference, tok_student, "reference", "student")

        examples = build_dataset(cfg.data, tok_student)
        cache_folder = None
        if self._use_teacher_cache(cfg, loss_cfg, onpolicy, len(tok_student), ctx):
            cache_spec = teacher_cache.CacheSpec(loss_cfg.teacher_cache_k, float(loss_cfg.temperature), len(tok_student))
            cache_folder = self._teacher_cache_folder(cfg, loss_cfg, cache_spec, examples, ctx)
        # off-policy runs on a built cache never call the teacher, so it is not loaded
        teacher = None
        if cache_folder is None or onpolicy.mode != "off" or not teacher_cache.TeacherCache.exists(cache_folder):
            teacher, _ = ctx.load_model("teacher")
            teacher.eval().requires_grad_(False)
        student, tokenizer = ctx.load_model("student")
        # the reference: the model given (reward correction), else a frozen copy of the student's start
        reference = None
        if given_reference:
            reference, _ = ctx.load_model("reference")
            reference.eval().requires_grad_(False)
        elif self._needs_reference(loss_cfg, onpolicy):
            reference = copy.deepcopy(student).eval().requires_grad_(False)
        vocab_size = self._common_vocab(student, teacher, len(tokenizer), ctx, reference)
        if loss_cfg.chunk_size:
            check_plain_head(student, "student")
            if teacher is not None:
                check_plain_head(teacher, "teacher")
            if reference is not None:
                check_plain_head(reference, "reference")

        if lora.enabled:
            student = with_lora(student, lora)

        cache = None
        if cache_folder is not None:
            cache = self._open_teacher_cache(cache_folder, cache_spec, cfg, loss_cfg, teacher, examples,
                                             tokenizer.pad_token_id, ctx)
        objective = KDObjective(registry.get("kd_loss", loss_cfg.name), ctx.blocks.params["loss"], temperature=loss_cfg.temperature, kd_ratio=loss_cfg.kd_ratio,
                                loca_alpha=loss_cfg.loca.alpha if loss_cfg.loca.enabled else None,
                                topk=loss_cfg.topk, chunk_size=loss_cfg.chunk_size, vocab_size=vocab_size,
                                reference=reference if loss_cfg.realign.enabled else None,
                                realign_lam=loss_cfg.realign.lam, cache=cache)
        sampling = Sampling(onpolicy.max_new_tokens, onpolicy.temperature, onpolicy.top_p, onpolicy.top_k)
        unwrap = ctx.accelerator.unwrap_model
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        if onpolicy.mode == "gkd":
            loss_fn = GKD(objective, teacher, unwrap, onpolicy.student_fraction, sampling, pad, eos, cfg.train.seed)
        elif onpolicy.mode == "gopd":
            loss_fn = GOPD(teacher, reference, unwrap, onpolicy.reward_scale, onpolicy.clip_eps, sampling, pad, eos,
                           onpolicy.agg)
        else:
            def loss_fn(model, batch, step):
                return objective(model, teacher, batch)

        ctx.log.info("distilling %s -> %s with %s (%s) on %d examples%s", cfg.teacher.path, cfg.student.path,
                     loss_cfg.name, onpolicy.mode, len(examples),
                     f"; reference {cfg.reference.path if given_reference else 'the student start'}" if reference is not None else "")
        method = "gopd" if onpolicy.mode == "gopd" else f"trra,{loss_cfg.name}" if loss_cfg.realign.enabled else loss_cfg.name
        result = ctx.train(student, examples, loss_fn, pad_id=pad, desc=f"distill[{method}]")
        student = ctx.accelerator.unwrap_model(student)
        if lora.enabled:
            student = student.merge_and_unload()  # a plain model: W + (alpha/r) * B @ A
        checkpoint = ctx.save(student, tokenizer) if cfg.save_checkpoint else None
        extra = {}
        if reference is not None:
            extra["reference"] = cfg.reference.path if given_reference else "student start"
        if loss_cfg.realign.enabled:
            extra["realign_lam"] = loss_cfg.realign.lam
        if cache is not None:
            extra["teacher_cache"] = {"folder": str(cache.folder), **cache.meta, "built": cache.built_s is not None,
                                      "build_s": cache.built_s}
        return RecipeResult(checkpoint=checkpoint, model=student, tokenizer=tokenizer, train=result,
                            extra={"distill": {"loss": loss_cfg.name, "mode": onpolicy.mode, "lora": lora.enabled,
                                               "compared_vocab": vocab_size, **extra}})

    def _use_teacher_cache(self, cfg, loss_cfg, onpolicy, vocab_size: int, ctx: RunContext) -> bool:
        """Whether this run reads the teacher from a cache; refuses what cannot work before weights load."""
        if loss_cfg.teacher_cache == "off":
            return False
        explicit = loss_cfg.teacher_cache != "auto"
        why_not = self._cache_serves(loss_cfg, onpolicy)
        if why_not is None and not Path(resolve_model_path(cfg.teacher)).is_dir():
            why_not = f"the teacher {cfg.teacher.path!r} is not a local folder (its content cannot be fingerprinted)"
            if explicit:
                raise ConfigError(f"loss.teacher_cache: {why_not}; set loss.teacher_cache=off")
        if why_not is not None:
            ctx.log.info("teacher cache: not used (%s); the teacher runs live", why_not)
            return False
        if loss_cfg.teacher_cache_k > vocab_size:
            raise ConfigError(f"loss.teacher_cache_k: {loss_cfg.teacher_cache_k} exceeds the vocabulary "
                              f"({vocab_size} tokens)")
        return True

    @staticmethod
    def _teacher_cache_folder(cfg, loss_cfg, spec: teacher_cache.CacheSpec, examples, ctx: RunContext) -> Path:
        """The entry for this teacher's content, this data and these loss settings."""
        run = {"dtype": str(cfg.teacher.dtype), "device": ctx.accelerator.device.type,
               "mixed_precision": str(cfg.train.mixed_precision)}
        key = teacher_cache.cache_key(spec, checkpoint_fingerprint(Path(resolve_model_path(cfg.teacher))),
                                      teacher_cache.data_fingerprint(examples), run)
        root = cache_dir() / "teacher_topk" if loss_cfg.teacher_cache == "auto" else Path(loss_cfg.teacher_cache).expanduser()
        return root / key

    @staticmethod
    def _open_teacher_cache(folder: Path, spec: teacher_cache.CacheSpec, cfg, loss_cfg, teacher, examples,
                            pad_id: int, ctx: RunContext) -> teacher_cache.TeacherCache:
        """The entry at `folder`, built first (on the main process) when it is not there."""
        built_s = None
        if ctx.is_main_process and not teacher_cache.TeacherCache.exists(folder):
            ctx.log.info("teacher cache: computing the teacher's top-%d on %d rows into %s", spec.k, len(examples), folder)
            t0 = time.perf_counter()
            teacher_cache.build(folder, teacher, examples, spec, pad_id, batch_size=cfg.train.batch_size,
                                chunk_size=loss_cfg.chunk_size or 1024, device=ctx.accelerator.device)
            built_s = round(time.perf_counter() - t0, 2)
        ctx.accelerator.wait_for_everyone()
        cache = teacher_cache.TeacherCache(folder, built_s)
        ctx.log.info("teacher cache: %s %s (%d tokens, %d bytes each)", "built" if built_s is not None else "reusing",
                     folder, cache.meta["tokens"], cache.meta["bytes_per_token"])
        return cache

    @staticmethod
    def _common_vocab(student, teacher, tokenizer_len: int, ctx: RunContext, reference=None) -> int:
        """Logit rows compared: the tokenizer's length; rows beyond it are padding and are dropped."""
        sizes = {"student": student.get_output_embeddings().weight.shape[0]}
        if teacher is not None:  # None: read from a teacher cache, checked when it was built
            sizes["teacher"] = teacher.get_output_embeddings().weight.shape[0]
        if reference is not None:
            sizes["reference"] = reference.get_output_embeddings().weight.shape[0]
        short = {k: v for k, v in sizes.items() if v < tokenizer_len}
        if short:
            raise ConfigError(f"{', '.join(short)}: output layer has fewer rows ({short}) than the tokenizer has "
                              f"tokens ({tokenizer_len}); the checkpoint does not match its tokenizer")
        padded = {k: v for k, v in sizes.items() if v > tokenizer_len}
        if padded:
            ctx.log.info("note: ignoring padded vocabulary rows beyond the tokenizer's %d tokens (%s)", tokenizer_len,
                         ", ".join(f"{k}: {v}" for k, v in padded.items()))
        return tokenizer_len
