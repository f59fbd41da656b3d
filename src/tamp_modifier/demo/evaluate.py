"""Accuracy per task family, relative performance (pruned / dense x 100), and fidelity to the dense model."""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm

from tamp_modifier.demo.model import prompt_batch
from tamp_modifier.demo.tasks import FAMILIES, Question

__all__ = [
    "accuracy", "answer_log_probs", "answer_questions", "compare_with_dense", "evaluate", "greedy_answers",
    "format_accuracy_table", "format_fidelity_table", "relative_performance",
]


@torch.no_grad()
def answer_log_probs(model, tokenizer, questions: list[Question], batch_size: int = 64,
                     progress: str | None = None) -> torch.Tensor:
    """``[Q, V]`` log-softmax of the next token after each prompt (the answer position).

    :param progress: a label for a progress bar (None: no bar)
    """
    device = next(model.parameters()).device
    out = []
    starts = range(0, len(questions), batch_size)
    if progress is not None:
        starts = tqdm(starts, desc=f"evaluating the {progress}", unit="batch")
    for start in starts:
        batch = prompt_batch(questions[start : start + batch_size], tokenizer)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
        # float64: distinct float32 logits stay distinct, so argmax is the logits' argmax
        out.append(torch.log_softmax(logits.double(), -1).cpu())
    return torch.cat(out)


def greedy_answers(log_probs: torch.Tensor, tokenizer) -> list[str]:
    """The most likely word of each row of ``[Q, V]`` answer log-probabilities."""
    return tokenizer.convert_ids_to_tokens(log_probs.argmax(-1).tolist())


def answer_questions(model, tokenizer, questions: list[Question], batch_size: int = 64,
                     progress: str | None = None) -> list[str]:
    """The model's greedy next word after each prompt (over the whole vocabulary)."""
    return greedy_answers(answer_log_probs(model, tokenizer, questions, batch_size, progress), tokenizer)


def accuracy(answers: list[str], questions: list[Question]) -> dict[str, float]:
    """Share of questions answered exactly right, per family (in ``FAMILIES`` order)."""
    right, total = defaultdict(int), defaultdict(int)
    for q, a in zip(questions, answers):
        total[q.family] += 1
        right[q.family] += a == q.answer
    return {f: right[f] / total[f] for f in FAMILIES if total[f]}


def evaluate(model, tokenizer, questions: list[Question], batch_size: int = 64,
             progress: str | None = None) -> dict[str, float]:
    """Share of questions answered exactly right, per family (in ``FAMILIES`` order)."""
    return accuracy(answer_questions(model, tokenizer, questions, batch_size, progress), questions)


def compare_with_dense(dense_log_probs: torch.Tensor, pruned_log_probs: torch.Tensor, tokenizer,
                       questions: list[Question]) -> tuple[dict, dict, dict]:
    """``(dense accuracy, pruned accuracy, fidelity)`` from both models' answer log-probabilities."""
    from tamp_modifier.demo.fidelity import fidelity

    answer_ids = tokenizer.convert_tokens_to_ids([q.answer for q in questions])
    return (accuracy(greedy_answers(dense_log_probs, tokenizer), questions),
            accuracy(greedy_answers(pruned_log_probs, tokenizer), questions),
            fidelity(dense_log_probs, pruned_log_probs, answer_ids, [q.family for q in questions]))


def relative_performance(pruned: dict[str, float], dense: dict[str, float]) -> dict[str, float | None]:
    """Per family ``100 * pruned / dense``, and their mean under ``"mean"`` (the paper's measure).

    A family the dense model never answers right has no relative figure (None)
    and stays out of the mean.
    """
    missing = set(dense) - set(pruned)
    if missing:
        raise ValueError(f"pruned accuracies lack families {sorted(missing)}")
    rel = {f: 100.0 * pruned[f] / dense[f] if dense[f] > 0 else None for f in dense}
    defined = [v for v in rel.values() if v is not None]
    rel["mean"] = sum(defined) / len(defined) if defined else None
    return rel


def format_accuracy_table(dense: dict[str, float], pruned: dict[str, float], label: str = "pruned") -> str:
    """Markdown table: accuracy per family, dense and pruned, and relative performance."""
    rel = relative_performance(pruned, dense)
    lines = [f"| task | dense | {label} | relative |", "|---|---:|---:|---:|"]
    def show(value):
        return "-" if value is None else f"{value:.1f}"

    for f in dense:
        lines.append(f"| {f} | {dense[f]:.1%} | {pruned[f]:.1%} | {show(rel[f])} |")
    mean_dense = sum(dense.values()) / len(dense)
    mean_pruned = sum(pruned[f] for f in dense) / len(dense)
    lines.append(f"| **mean** | {mean_dense:.1%} | {mean_pruned:.1%} | **{show(rel['mean'])}** |")
    return "\n".join(lines)


def format_fidelity_table(fidelity: dict[str, dict[str, float]]) -> str:
    """Markdown table: KL(dense || pruned), answer NLL (pruned, dense), agreement, per family."""
    lines = ["| task | KL(dense‖pruned) (nats) | answer NLL, pruned | answer NLL, dense "
             "| same answer as dense |",
             "|---|---:|---:|---:|---:|"]
    for name, f in fidelity.items():
        label = "**overall**" if name == "overall" else name
        lines.append(f"| {label} | {f['kl']:.4f} | {f['nll']:.4f} | {f['nll_dense']:.4f} "
                     f"| {f['agreement']:.1%} |")
    return "\n".join(lines)
