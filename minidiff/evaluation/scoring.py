"""Zero-shot multiple choice scored by likelihood, its error bars, and the runner of one task (or perplexity).

References: Diffutron (arXiv 2603.20466, Table 4), LLaDA (2502.09992); matches lm-evaluation-harness's
multiple choice. Reader's page: docs/evaluation.md; derivations: docs/math.md section 4.

    loglik(c)  = log p(" " + c | <bos> prompt)    (answers.score_answers: exact or Monte Carlo)
    acc = mean[argmax_c loglik(c) == label],  acc_norm = the same with loglik(c) / len(c) (chars)
    error bars (metric_errors): the metric's std over runs resampled from items and N(loglik, se^2)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from minidiff.data.readers import read_rows
from minidiff.diffusion import DEFAULT_MC_SAMPLES
from minidiff.errors import UserError
from minidiff.evaluation.answers import item_seed, score_answers
from minidiff.evaluation.perplexity import mlm_perplexity
from minidiff.evaluation.tasks import F1, GENERIC, TASKS, Example, TaskDef
from minidiff.plumbing.progress import bar as progress_bar


@dataclass(frozen=True)
class TaskSpec:
    """A parsed --task: kind "perplexity" | "mc"; `task` for mc; `source` a path/URI or None."""

    kind: str
    key: str                       # the results key, e.g. "belebele_tr" or "perplexity:essays.txt"
    source: str | None
    task: TaskDef | None = None


def parse_task(text: str) -> TaskSpec:
    """`perplexity:SRC`, `mc:FILE`, `NAME` (hub) or `NAME:FILE` for NAME in TASKS."""
    name, _, source = text.partition(":")
    name = name.strip().lower()
    if name == "perplexity":
        if not source:
            raise UserError("--task perplexity needs a source: --task perplexity:FILE_OR_DIR")
        return TaskSpec("perplexity", text, source)
    if name == "mc":
        if not source:
            raise UserError("--task mc needs a file: --task mc:FILE.jsonl with rows "
                            '{"prompt": str, "choices": [str], "label": int}')
        return TaskSpec("mc", text, source, GENERIC)
    if name not in TASKS:
        raise UserError(f"--task {text!r} is not a known task; expected one of "
                        f"{', '.join(TASKS)}, mc:FILE or perplexity:SRC")
    return TaskSpec("mc", name, source or None, TASKS[name])


def load_examples(spec: TaskSpec, limit: int | None = None) -> list[Example]:
    """Read the task's rows (local file, or the hub when no file is given) and render them."""
    task, source = spec.task, spec.source or spec.task.hub_uri
    if spec.source and not source.startswith("hf://") and not Path(source).exists():
        raise UserError(f"--task {spec.key}: file {source} does not exist")
    try:
        rows = read_rows(source)
    except UserError as err:
        raise UserError(f"--task {spec.key}: {err}") from None
    except (OSError, ConnectionError) as err:  # offline, or the hub refused
        raise UserError(f"--task {spec.key}: could not read {source} ({type(err).__name__}); "
                        f"offline? pass a local file as --task {task.name}:FILE") from None
    problems = getattr(rows, "problems", None)
    if problems:  # a benchmark is scored on every row or not at all
        raise UserError(f"--task {spec.key}: {problems[0]} ({len(problems)} unreadable line(s) in "
                        f"{source}); fix or remove them")
    rows = rows if limit is None else rows[:limit]
    if not rows:
        raise UserError(f"--task {spec.key}: {source} has no rows")
    examples = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"--task {spec.key}: row {number} of {source} is not an object")
        missing = [key for key in task.required if key not in row]
        if missing:
            raise UserError(f"--task {spec.key}: row {number} of {source} lacks {missing} "
                            f"(a {task.title} row needs {list(task.required)})")
        try:
            examples.append(task.render(row))
        except UserError as err:
            raise UserError(f"--task {spec.key}: row {number} of {source}: {err}") from None
    return examples


# ----------------------------------------------------------------------------- scoring
MAX_BATCH_SIZE = 1024  # rows per forward at most (--batch-size)
DEFAULT_SCORING = "auto"  # docs/evaluation.md, "How many samples"


def prompt_ids(tok, text: str) -> list[int]:
    """<bos> + the text's own tokens (no <eos>: it would sit between prompt and answer)."""
    return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text, add_special_tokens=False)


def fit_prompt(prompt: list[int], room: int) -> list[int]:
    """The prompt cut to `room` tokens from the left, keeping its first token (<bos>)."""
    return prompt if len(prompt) <= room else prompt[:1] + prompt[len(prompt) - room + 1:]


def choice_pairs(tok, example: Example, context: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids of " " + choice) per choice, the prompt cut after <bos> to fit `context`."""
    prompt, pairs = prompt_ids(tok, example.prompt), []
    for choice in example.choices:
        answer = tok.encode(" " + choice, add_special_tokens=False)
        if not answer:
            raise UserError(f"choice {choice!r} tokenises to nothing")
        if context is not None and len(answer) >= context:
            raise UserError(f"choice {choice[:40]!r} is {len(answer)} tokens long; it does not fit "
                            f"the model's context of {context} tokens after <bos>")
        room = len(prompt) + len(answer) if context is None else context - len(answer)
        pairs.append((fit_prompt(prompt, room), answer))
    return pairs


@dataclass
class ScoredItems:
    """Per item and choice: loglik, se and exact of answers.AnswerScore; truncated: items whose prompt was cut."""

    scores: list[list[float]]
    errors: list[list[float]]
    exact: list[list[bool]]
    truncated: int = 0

    def counts(self) -> dict[str, int]:
        flags = [flag for item in self.exact for flag in item]
        return {"exact": sum(flags), "mc": len(flags) - sum(flags)}


def score_items(model, tok, examples: Sequence[Example], *, mc_samples: int = DEFAULT_MC_SAMPLES,
                batch_size: int = 32, seed: int = 0, scoring: str = "mc", context: int | None = None,
                rows_per_step: int = 64, progress: bool = True, desc: str = "mc") -> ScoredItems:
    """answers.score_answers of every choice; an item's choices share the stream of item_seed(seed, prompt)."""
    scored = ScoredItems([], [], [])
    bar = progress_bar(total=len(examples), desc=desc, disable=not progress, unit="row")
    for start in range(0, len(examples), rows_per_step):
        chunk = examples[start:start + rows_per_step]
        per_item = [choice_pairs(tok, ex, context) for ex in chunk]
        seeds = [item_seed(seed, ex.prompt) for ex in chunk for _ in ex.choices]
        got = score_answers(
            model, [pair for pairs in per_item for pair in pairs], tok.mask_id, pad_id=tok.pad_id,
            num_samples=mc_samples, batch_size=batch_size, scoring=scoring, seeds=seeds)
        offset = 0
        for ex, pairs in zip(chunk, per_item):
            full = len(prompt_ids(tok, ex.prompt))
            scored.truncated += any(len(prompt) < full for prompt, _ in pairs)
            item = got[offset:offset + len(ex.choices)]
            scored.scores.append([a.loglik for a in item])
            scored.errors.append([a.se for a in item])
            scored.exact.append([a.exact for a in item])
            offset += len(ex.choices)
        bar.update(len(chunk))
    bar.close()
    return scored


def score_examples(model, tok, examples: Sequence[Example], *, mc_samples: int = DEFAULT_MC_SAMPLES,
                   batch_size: int = 32, seed: int = 0, scoring: str = "mc", progress: bool = True,
                   desc: str = "mc") -> list[list[float]]:
    return score_items(model, tok, examples, mc_samples=mc_samples, batch_size=batch_size, seed=seed,
                       scoring=scoring, progress=progress, desc=desc).scores


def binary_f1(gold: Sequence[int], pred: Sequence[int], positive: int = 1) -> float:
    """F1 of one class, 0 when it never occurs (sklearn's f1_score default, which lm-eval's `f1` calls)."""
    tp = sum(g == positive and p == positive for g, p in zip(gold, pred))
    fp = sum(g != positive and p == positive for g, p in zip(gold, pred))
    fn = sum(g == positive and p != positive for g, p in zip(gold, pred))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    classes = sorted(set(gold) | set(pred))
    return sum(binary_f1(gold, pred, c) for c in classes) / len(classes)


def mc_metrics(examples: Sequence[Example], scores: Sequence[Sequence[float]],
               metrics: Sequence[str] = F1) -> dict[str, float]:
    """acc, acc_norm (loglik / characters of the choice) and as asked f1 (label 1) and macro_f1 of acc's."""
    def argmax(values):
        return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties

    gold = [ex.label for ex in examples]
    pred = [argmax(s) for s in scores]
    pred_norm = [argmax([v / len(c) for v, c in zip(s, ex.choices)]) for s, ex in zip(scores, examples)]
    out = {"acc": sum(p == g for p, g in zip(pred, gold)) / len(gold),
           "acc_norm": sum(p == g for p, g in zip(pred_norm, gold)) / len(gold)}
    if "f1" in metrics:
        out["f1"] = binary_f1(gold, pred)
    if "macro_f1" in metrics:
        out["macro_f1"] = macro_f1(gold, pred)
    return out


# ----------------------------------------------------------------------------- error bars
def _metric_draws(scores, chars, gold, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """mc_metrics of b runs: scores [b, n, C], chars [b, n, C], gold [b, n] -> {metric: [b]}."""
    pred = scores.argmax(-1)  # [b, n]  (first of ties, as mc_metrics)
    out = {"acc": (pred == gold).mean(1), "acc_norm": ((scores / chars).argmax(-1) == gold).mean(1)}
    classes = np.arange(scores.shape[-1])[:, None, None]  # [C, 1, 1]
    is_gold, is_pred = gold == classes, pred == classes  # [C, b, n]
    tp, fp, fn = [counts.sum(-1).T for counts in (is_gold & is_pred, ~is_gold & is_pred, is_gold & ~is_pred)]  # [b, C]
    denominator = 2 * tp + fp + fn
    # F1_c = 2 tp / (2 tp + fp + fn), 0 when class c never occurs
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)  # [b, C]
    if "f1" in metrics:
        out["f1"] = f1[:, 1]
    if "macro_f1" in metrics:  # the mean over the classes seen in gold or pred
        out["macro_f1"] = f1.sum(1) / np.maximum((denominator > 0).sum(1), 1)
    return out


def metric_errors(examples: Sequence[Example], scored: ScoredItems, metrics: Sequence[str] = F1, *,
                  draws: int = 1000, seed: int = 0, chunk: int = 50) -> dict[str, dict[str, float]]:
    """{metric: {"se": total, "mc_se": Monte-Carlo noise alone}} (docs/evaluation.md, "Error bars")."""
    # loglik, se, characters [n, C], C the most choices; missing choices -inf
    width = max(len(ex.choices) for ex in examples)
    mean = np.full((len(examples), width), -np.inf)
    se, chars = np.zeros((len(examples), width)), np.ones((len(examples), width))
    for i, ex in enumerate(examples):
        k = len(ex.choices)
        mean[i, :k], se[i, :k], chars[i, :k] = scored.scores[i], scored.errors[i], [len(c) for c in ex.choices]
    if np.isnan(se).any():
        names = ["acc", "acc_norm"] + [k for k in ("f1", "macro_f1") if k in metrics]
        return {k: {"mc_se": None, "se": None} for k in names}
    gold = np.array([ex.label for ex in examples])
    rng = np.random.default_rng(seed)
    runs = {"mc_se": [], "se": []}
    for start in range(0, draws, chunk):  # [b, n, C] arrays, b <= chunk
        b = min(chunk, draws - start)
        every = np.broadcast_to(np.arange(len(examples)), (b, len(examples)))
        for name, items in (("mc_se", every), ("se", rng.integers(len(examples), size=every.shape))):
            noisy = mean[items] + se[items] * rng.standard_normal(items.shape + mean.shape[1:])
            runs[name].append(_metric_draws(noisy, chars[items], gold[items], metrics))
    return {k: {name: float(np.concatenate([r[k] for r in runs[name]]).std(ddof=1)) for name in runs}
            for k in runs["se"][0]}


# ----------------------------------------------------------------------------- one task
def run_task(model, tok, spec: TaskSpec, *, examples: Sequence[Example] | None = None,
             texts: Sequence[str] | None = None, mc_samples: int = DEFAULT_MC_SAMPLES, batch_size: int = 32,
             seed: int = 0, scoring: str = DEFAULT_SCORING, max_len: int = 512, mask_prob: float = 0.15,
             mlm_replace: bool = False, nelbo: bool = True, progress: bool = True,
             items_out: list | None = None) -> dict:
    """One parsed task's result dict; `items_out` (if given) receives one dict per multiple-choice item."""
    context = model.config.max_position_embeddings
    if spec.kind == "perplexity":
        block = min(max_len, context)
        probe = mlm_perplexity(model, tok, texts, max_len=block, mask_prob=mask_prob, replace=mlm_replace,
                               seed=seed, batch_size=batch_size, nelbo=nelbo, progress=progress)
        title = spec.source if spec.source.startswith("hf://") else Path(spec.source).name
        return {"kind": "perplexity", "title": title, "source": spec.source, "n": probe["n_masked"],
                "metrics": {k: probe[k] for k in ("perplexity", "nelbo_perplexity") if k in probe},
                "n_tokens": probe["n_tokens"], "n_blocks": probe["n_blocks"],
                "settings": {"max_len": max_len, "block_len": probe["block_len"], "clamped_to_context": block < max_len,
                             "mask_prob": mask_prob, "mask_count": "floor(p*n + 0.5) per block",
                             "mlm_replace_80_10_10": mlm_replace, "mask_logit": "removed (as in training)",
                             "framing": "tokenizer post-processor per document", "seed": seed,
                             "nelbo": "linear schedule, one t per block, / non-special tokens"}}
    scored = score_items(model, tok, examples, mc_samples=mc_samples, batch_size=batch_size,
                         seed=seed, scoring=scoring, context=context, progress=progress, desc=spec.key)
    if items_out is not None:  # None for an se from a single sample (unknown)
        items_out.extend({"task": spec.key, "item": i, "label": ex.label, "choices": list(ex.choices),
                          "loglik": scored.scores[i], "se": [None if math.isnan(e) else e for e in scored.errors[i]],
                          "exact": scored.exact[i]} for i, ex in enumerate(examples))
    title = spec.task.title if spec.task is not GENERIC else Path(spec.source).name
    return {"kind": "mc", "title": title, "source": spec.source or spec.task.hub_uri,
            "n": len(examples), "metrics": mc_metrics(examples, scored.scores, spec.task.metrics),
            "errors": metric_errors(examples, scored, spec.task.metrics, seed=seed),
            "answers_scored": scored.counts(), "truncated_prompts": scored.truncated,
            "unlabeled": sum(ex.label < 0 for ex in examples),
            "settings": {"scoring": scoring, "mc_samples": mc_samples, "one_token_samples": 1,
                         "batch_size": batch_size, "seed": seed, "context": context,
                         "draws": "per item, from a generator seeded with a hash of (seed, prompt)",
                         "errors": "bootstrap over items x N(loglik, se^2) per choice, 1000 runs",
                         "framing": "<bos> prompt | ' ' + choice (no <eos>)"}}
