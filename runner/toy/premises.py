"""The premises the paper family's methods assume, measured on the toy zoo (``python -m runner.toy eval``).

Each premise comes from the papers or from measurable properties of the real model pairs they used:

- a Base LM has seen chat-formatted text, so a chat response is not near-zero probability under it
  (probability-gated SFT such as ProFit and DFT trains on the tokens the model already gives p >= tau);
- Instruct and Thinking are light post-trainings of one Base: Shadow-FT reports real Base/Instruct
  pairs within 2% relative weight distance; we require 5%. MI interpolates pairs that are linearly
  connected: the held-out chat loss along the Instruct -> Thinking path has no barrier;
- Thinking is more accurate on hard problems and writes longer answers;
- the distillation student is competent but clearly weaker than the teacher, as after the SFT stage
  that KD papers start from.

All measurements use the held-out test problems only (never training data).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATH_LAMBDAS = tuple(i / 10 for i in range(11))
PROFIT_TAU = 0.1  # ProFit's default probability gate


def projection_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.state_dict().items()
            if k.endswith(".weight") and k.split(".")[-2] in PROJECTIONS}


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """‖A - B‖ / ‖Ref‖ over the projection weights, each norm taken over all of them together."""
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].pow(2).sum()) for k in ref)
    return (num / den) ** 0.5


def heldout_chats(tokenizer, fmt: str, variation: float = 0.0, seed: int = 0) -> list[dict]:
    """The easy and hard test problems as tokenized chats of `fmt` (labels on the response only).

    Each row also says, per response token, whether it spells the final answer (``answer``), ends the
    turn (``eos``) or is the rest of the response (``other``: restated question, phrasing, working)."""
    from runner.data import IGNORE, tokenize_records
    from runner.toy.tasks import TaskSpec, render, test_problems

    spec, rng = TaskSpec(), random.Random(f"premises-{seed}-{fmt}")
    problems = [(split, p) for split in ("easy", "hard") for p in test_problems(spec, split)]
    records = [render(p, fmt, rng, variation) for _, p in problems]
    rows = []
    for (split, problem), (ids, labels) in zip(problems, tokenize_records(records, tokenizer, chat=True)):
        labels[0] = IGNORE
        rows.append({"input_ids": ids, "labels": labels, "split": split,
                     "kinds": _token_kinds(tokenizer, ids, labels, str(problem.answer))})
    return rows


def _token_kinds(tokenizer, ids: list[int], labels: list[int], answer: str) -> list[str]:
    """answer / eos / other for each response token, in order (the answer is its last occurrence)."""
    positions = [i for i, label in enumerate(labels) if label != -100]
    spans, text = [], ""
    for i in positions:
        piece = tokenizer.decode([ids[i]])
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    at = text.rfind(answer)
    kinds = []
    for i, (start, end) in zip(positions, spans):
        if ids[i] == tokenizer.eos_token_id:
            kinds.append("eos")
        else:
            kinds.append("answer" if at >= 0 and start < at + len(answer) and end > at else "other")
    return kinds


def kept_by_gate(probabilities: torch.Tensor, rows: list[dict], tau: float = PROFIT_TAU) -> dict[str, float]:
    """The share of response tokens with p >= tau (those ProFit trains on), for the answer tokens of the
    easy and the hard problems and for the other tokens (`probabilities` in `token_probabilities` order)."""
    groups = [f"{r['split']} answer" if k == "answer" else k for r in rows for k in r["kinds"]]
    kept = probabilities >= tau
    return {g: float(kept[[x == g for x in groups]].float().mean()) for g in ("easy answer", "hard answer", "other")}


@torch.no_grad()
def _response_logprobs(model, rows: list[dict], batch_size: int = 128):
    """Yield (log-softmax over the vocabulary, target ids) at each batch's response positions."""
    from runner.data import collate, shift_labels

    model.eval()
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i:i + batch_size], pad_id=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets, mask = shift_labels(batch["labels"])
        yield torch.log_softmax(logits[mask], dim=-1), targets[mask]


def token_probabilities(model, rows: list[dict]) -> torch.Tensor:
    """The model's probability of every response token of `rows`."""
    return torch.cat([lp.gather(1, t[:, None])[:, 0].exp() for lp, t in _response_logprobs(model, rows)])


@torch.no_grad()
def response_entropy(model, rows: list[dict]) -> list[float]:
    """Per chat, the mean entropy (nats) of the model's next-token distribution over its response tokens
    (the policy entropy that PSFT keeps and plain SFT collapses)."""
    per_token = torch.cat([-(lp.exp() * lp).sum(-1) for lp, _ in _response_logprobs(model, rows)])
    counts = [sum(label != -100 for label in r["labels"][1:]) for r in rows]
    return [float(chunk.mean()) for chunk in per_token.split(counts)]


def chat_loss(model, rows: list[dict]) -> float:
    """Token-mean cross-entropy (nats) over the response tokens."""
    losses = [-lp.gather(1, t[:, None])[:, 0] for lp, t in _response_logprobs(model, rows)]
    return float(torch.cat(losses).mean())


@torch.no_grad()
def reverse_kl(student, teacher, rows: list[dict]) -> float:
    """KL(student || teacher) per response token (nats), on the reference responses."""
    total, count = 0.0, 0
    for (lq, _), (lp, _) in zip(_response_logprobs(student, rows), _response_logprobs(teacher, rows)):
        total += float((lq.exp() * (lq - lp)).sum())
        count += lq.shape[0]
    return total / count


@torch.no_grad()
def interpolation_path(model_a, model_b, rows: list[dict], lambdas=PATH_LAMBDAS) -> list[float]:
    """Held-out chat loss of (1 - lam) A + lam B for each lam (model_a is restored afterwards)."""
    a = {k: v.clone() for k, v in model_a.state_dict().items()}
    b = model_b.state_dict()
    losses = []
    try:
        for lam in lambdas:
            model_a.load_state_dict({k: (1 - lam) * a[k] + lam * b[k] if a[k].is_floating_point() else a[k] for k in a})
            losses.append(chat_loss(model_a, rows))
    finally:
        model_a.load_state_dict(a)
    return losses


def barrier(losses: list[float], lambdas=PATH_LAMBDAS) -> float:
    """The largest excess of the path's loss over the straight line between its ends (0 if none)."""
    lo, hi = losses[0], losses[-1]
    return max(0.0, *(loss - ((1 - lam) * lo + lam * hi) for lam, loss in zip(lambdas, losses)))


@dataclass
class Premise:
    name: str
    measured: str
    target: str
    holds: bool


def measure(models: dict, tokenizer, metrics: dict[str, dict[str, float]]) -> dict:
    """Every premise measurement. `models` maps zoo names to loaded models; `metrics` holds their toy-task
    metrics (``toy_arith/exact_match`` ...)."""
    varied = heldout_chats(tokenizer, "instruct", variation=0.5)
    instruct_rows = heldout_chats(tokenizer, "instruct")
    path_rows = instruct_rows + heldout_chats(tokenizer, "thinking")
    probs = {n: token_probabilities(models[n], varied) for n in ("toy-base", "toy-instruct")}
    w = {n: projection_weights(models[n]) for n in ("toy-base", "toy-instruct", "toy-thinking")}
    path = interpolation_path(models["toy-instruct"], models["toy-thinking"], path_rows)
    params = {n: sum(p.numel() for p in models[n].parameters()) for n in ("toy-teacher", "toy-student")}
    return {
        "response_token_prob": {n: float(p.mean()) for n, p in probs.items()},
        "response_tokens_above_tau": {n: float((p >= PROFIT_TAU).float().mean()) for n, p in probs.items()},
        "base_tokens_above_tau_by_kind": kept_by_gate(probs["toy-base"], varied),
        "relative_distance": {
            "instruct-base": relative_distance(w["toy-instruct"], w["toy-base"], w["toy-base"]),
            "thinking-base": relative_distance(w["toy-thinking"], w["toy-base"], w["toy-base"]),
            "instruct-thinking": relative_distance(w["toy-instruct"], w["toy-thinking"], w["toy-base"]),
        },
        "path_lambdas": list(PATH_LAMBDAS),
        "path_loss": path,
        "barrier": barrier(path),
        "parameters": params,
        "parameter_ratio": params["toy-teacher"] / params["toy-student"],
        "reverse_kl_student_teacher": reverse_kl(models["toy-student"], models["toy-teacher"], instruct_rows),
        "easy_em": {n: metrics[n]["toy_arith/exact_match"] for n in metrics},
        "hard_em": {n: metrics[n]["toy_arith_hard/exact_match"] for n in metrics},
        "hard_response_tokens": {n: metrics[n]["toy_arith_hard/response_tokens"] for n in metrics},
    }


def premises(m: dict) -> list[Premise]:
    """The premise table: what each premise requires (declared here, before anything is measured) and
    whether the measurement holds it."""
    p, d, easy, hard = m["response_token_prob"], m["relative_distance"], m["easy_em"], m["hard_em"]
    kind = m["base_tokens_above_tau_by_kind"]
    tokens = m["hard_response_tokens"]
    return [
        Premise("Base gives chat responses real probability (mean response-token p, varied phrasings)",
                f"Base {p['toy-base']:.3f}, Instruct {p['toy-instruct']:.3f}; under Base p >= {PROFIT_TAU} "
                f"for {kind['other']:.0%} of the tokens around the answer, {kind['easy answer']:.0%} / "
                f"{kind['hard answer']:.0%} of the easy / hard answer tokens",
                "Base >= 0.2", p["toy-base"] >= 0.2),
        Premise("Instruct and Thinking are light post-trainings of Base (‖W - W_base‖ / ‖W_base‖)",
                f"Instruct {d['instruct-base']:.3f}, Thinking {d['thinking-base']:.3f}, "
                f"Instruct<->Thinking {d['instruct-thinking']:.3f}",
                "each <= 0.05", max(d["instruct-base"], d["thinking-base"]) <= 0.05),
        Premise("Instruct and Thinking are linearly connected (held-out chat loss barrier, nats/token)",
                f"{m['barrier']:.3f} (path {' '.join(f'{x:.2f}' for x in m['path_loss'])})",
                "<= 0.1", m["barrier"] <= 0.1),
        Premise("Thinking is more accurate on hard problems and writes longer answers (hard EM, tokens)",
                f"Thinking {hard['toy-thinking']:.3f} / {tokens['toy-thinking']:.1f}, "
                f"Instruct {hard['toy-instruct']:.3f} / {tokens['toy-instruct']:.1f}",
                "EM higher, tokens >= 2x",
                hard["toy-thinking"] > hard["toy-instruct"] and tokens["toy-thinking"] >= 2 * tokens["toy-instruct"]),
        Premise("The student is competent but weaker (easy EM)",
                f"{easy['toy-student']:.3f}", "0.3 to 0.7", 0.3 <= easy["toy-student"] <= 0.7),
        Premise("The teacher is clearly stronger (easy / hard EM; parameters)",
                f"teacher {easy['toy-teacher']:.3f} / {hard['toy-teacher']:.3f}, student {easy['toy-student']:.3f} / "
                f"{hard['toy-student']:.3f}; {m['parameter_ratio']:.1f}x the parameters; "
                f"KL(student‖teacher) {m['reverse_kl_student_teacher']:.3f} nats/token",
                "easy and hard EM >= student + 0.2",
                easy["toy-teacher"] >= easy["toy-student"] + 0.2 and hard["toy-teacher"] >= hard["toy-student"] + 0.2),
    ]
