"""Evaluation: the paper's MLM perplexity probe and zero-shot multiple-choice benchmarks.

References: Diffutron (arXiv 2603.20466, Table 4), BERT (1810.04805: the 80/10/10 masking),
LLaDA (2502.09992: likelihood of an answer). Matches HF transformers' `run_mlm.py` (the
perplexity probe), lm-evaluation-harness (multiple choice, acc / acc_norm) and CETVEL's task
files (tasks.py). Reader's page: docs/evaluation.md.

    perplexity = exp( sum_{masked i} -log p(x_i | corrupted block) / #masked )   15% of each block
    loglik(c)  = log p(" " + c | <bos> prompt)    (answers.score_answers: exact or Monte Carlo)
    acc = mean[argmax_c loglik(c) == label],  acc_norm = the same with loglik(c) / len(c) (chars)
    error bars (metric_errors): the metric's std over runs resampled from items and N(loglik, se^2)
Derivations: docs/math.md sections 4-5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from minidiff.data.readers import read_rows
from minidiff.errors import UserError
from minidiff.evaluation.answers import score_answers
from minidiff.evaluation.tasks import F1, GENERIC, TASKS, Example, TaskDef
from minidiff.plumbing.device import model_device
from minidiff.plumbing.progress import bar as progress_bar
from minidiff.speed import chunked_loss


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
# rows per forward at most (--batch-size): beyond what keeps a GPU busy, short of exhausting its memory
MAX_BATCH_SIZE = 1024
# the defaults (docs/evaluation.md, "How many samples"): answers of up to 7 tokens exact (2^7 - 1 = 127
# rows), longer ones 128 Monte-Carlo samples
DEFAULT_SCORING, DEFAULT_MC_SAMPLES = "auto", 128


def prompt_ids(tok, text: str) -> list[int]:
    """<bos> + the text's own tokens (no <eos>: it would sit between prompt and answer)."""
    return ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text, add_special_tokens=False)


def fit_prompt(prompt: list[int], room: int) -> list[int]:
    """The prompt cut to `room` tokens from the left, keeping its first token (<bos>)."""
    return prompt if len(prompt) <= room else prompt[:1] + prompt[len(prompt) - room + 1:]


def choice_pairs(tok, example: Example, context: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per choice: `prompt_ids` and `" " + choice` without special tokens.
    With `context` (the model's length limit) the prompt loses its left part after `<bos>` until
    prompt + answer fit; an answer that cannot fit is refused."""
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
    """Per item and choice: loglik (log p(" " + choice | prompt)), se (its Monte-Carlo standard
    error, 0 when exact), exact (enumerated or not); truncated: items whose prompt was cut."""

    scores: list[list[float]]
    errors: list[list[float]]
    exact: list[list[bool]]
    truncated: int = 0

    def counts(self) -> dict[str, int]:
        flags = [flag for item in self.exact for flag in item]
        return {"exact": sum(flags), "mc": len(flags) - sum(flags)}


def score_items(model, tok, examples: Sequence[Example], *, mc_samples: int = 32,
                batch_size: int = 32, seed: int = 0, scoring: str = "mc", context: int | None = None,
                rows_per_step: int = 64, progress: bool = True, desc: str = "mc") -> ScoredItems:
    """log p(" " + choice | prompt) with its standard error for every choice of every example
    (answers.score_answers, `scoring` auto | exact | mc); every answer's draws seeded with `seed`."""
    scored = ScoredItems([], [], [])
    bar = progress_bar(total=len(examples), desc=desc, disable=not progress, unit="row")
    for start in range(0, len(examples), rows_per_step):
        chunk = examples[start:start + rows_per_step]
        per_item = [choice_pairs(tok, ex, context) for ex in chunk]
        got = score_answers(
            model, [pair for pairs in per_item for pair in pairs], tok.mask_id, pad_id=tok.pad_id,
            num_samples=mc_samples, batch_size=batch_size, scoring=scoring, pair_seed=seed)
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


def score_examples(model, tok, examples: Sequence[Example], *, mc_samples: int = 32, batch_size: int = 32,
                   seed: int = 0, scoring: str = "mc", progress: bool = True, desc: str = "mc") -> list[list[float]]:
    """The log-likelihoods of `score_items` alone."""
    return score_items(model, tok, examples, mc_samples=mc_samples, batch_size=batch_size, seed=seed,
                       scoring=scoring, progress=progress, desc=desc).scores


def binary_f1(gold: Sequence[int], pred: Sequence[int], positive: int = 1) -> float:
    """F1 of one class: 2 tp / (2 tp + fp + fn), 0 when it never occurs (sklearn's f1_score
    default, which lm-eval's `f1` aggregation calls)."""
    tp = sum(g == positive and p == positive for g, p in zip(gold, pred))
    fp = sum(g != positive and p == positive for g, p in zip(gold, pred))
    fn = sum(g == positive and p != positive for g, p in zip(gold, pred))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Unweighted mean of `binary_f1` over the classes seen in gold or pred."""
    classes = sorted(set(gold) | set(pred))
    return sum(binary_f1(gold, pred, c) for c in classes) / len(classes)


def mc_metrics(examples: Sequence[Example], scores: Sequence[Sequence[float]],
               metrics: Sequence[str] = F1) -> dict[str, float]:
    """acc (argmax of loglik), acc_norm (argmax of loglik / characters of the choice), and as
    asked: f1 (binary, label 1) and macro_f1, both of the acc prediction."""
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
def _padded(examples: Sequence[Example], scored: ScoredItems):
    """(loglik, se, characters) as [n, C] arrays, C the most choices; missing choices -inf."""
    width = max(len(ex.choices) for ex in examples)
    mean = np.full((len(examples), width), -np.inf)
    se, chars = np.zeros((len(examples), width)), np.ones((len(examples), width))
    for i, ex in enumerate(examples):
        k = len(ex.choices)
        mean[i, :k], se[i, :k], chars[i, :k] = scored.scores[i], scored.errors[i], [len(c) for c in ex.choices]
    return mean, se, chars


def _metric_draws(scores, chars, gold, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Every metric of mc_metrics for each of b resampled runs: scores [b, n, C], chars
    [b, n, C], gold [b, n] -> {metric: [b]}."""
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
    """{metric: {"se": total, "mc_se": Monte-Carlo noise alone}} from `draws` resampled runs
    (docs/evaluation.md, "Error bars"): mc_se redraws each choice's score from N(loglik, se^2)
    with the items kept; se also resamples the items with replacement. Each is the standard
    deviation of the metric over the runs (0 when all exact; None when an answer's error is
    unknown, i.e. it was scored from a single sample)."""
    mean, se, chars = _padded(examples, scored)
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


# ----------------------------------------------------------------------------- perplexity
def mlm_corrupt(ids, mask_id: int, maskable, *, mask_prob: float = 0.15, replace: bool = False,
                vocab_size: int | None = None, generator=None):
    """BERT's fixed-ratio masking: (corrupted ids [B, S], is_target [B, S] bool).

    Each row gets exactly k = floor(p n + 0.5) targets among its n maskable positions (never
    special tokens or padding), a uniformly random k-subset (the k smallest of n iid uniforms).
    replace=True follows BERT's 80/10/10 rule (HF DataCollatorForLanguageModeling): 80% <mask>,
    10% a token uniform in [0, vocab_size), 10% unchanged; otherwise every target becomes <mask>.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise UserError(f"mask_prob={mask_prob} is outside [0, 1]")
    if replace and vocab_size is None:
        raise ValueError("mlm_corrupt(replace=True) needs vocab_size for the random 10%")
    maskable = maskable.bool()
    # k_b = floor(p * n_b + 0.5)   (float64 so that p * n lands where a reader computes it)
    count = torch.floor(maskable.sum(1).double() * mask_prob + 0.5).long()  # [B]
    # rank the maskable positions by a uniform score; non-maskable ones (score 2) rank last
    scores = torch.rand(ids.shape, generator=generator, device=ids.device).masked_fill(~maskable, 2.0)  # [B, S]
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [B, S] rank of each position in its row
    is_target = ranks < count[:, None]  # [B, S]
    if not replace:
        return torch.where(is_target, torch.full_like(ids, mask_id), ids), is_target
    choice = torch.rand(ids.shape, generator=generator, device=ids.device)  # [B, S]
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=ids.device)
    # u < 0.8 -> <mask>;  0.8 <= u < 0.9 -> random token;  u >= 0.9 -> unchanged
    corrupted = torch.where(is_target & (choice < 0.8), torch.full_like(ids, mask_id), ids)
    corrupted = torch.where(is_target & (choice >= 0.8) & (choice < 0.9), random_ids, corrupted)
    return corrupted, is_target


def mlm_loss(model, ids, mask_id: int, *, maskable, attention_mask=None, mask_prob: float = 0.15,
             replace: bool = False, vocab_size: int | None = None, exclude_mask_logit: bool = False,
             generator=None):
    """BERT's fixed-ratio MLM loss: (mean CE over the targets, number of targets). maskable [B, S]
    bool or None (every position), never padding under an attention_mask; the softmax runs over the
    full vocabulary (HF run_mlm) unless exclude_mask_logit=True (as in the diffusion losses)."""
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    maskable = torch.ones_like(ids, dtype=torch.bool) if maskable is None else maskable.bool()
    if attention_mask is not None:
        maskable = maskable & attention_mask.bool()
    corrupted, is_target = mlm_corrupt(ids, mask_id, maskable, mask_prob=mask_prob,
                                       replace=replace, vocab_size=vocab_size, generator=generator)
    # mean over targets: sum_i CE_i / N
    weight = torch.tensor(1.0 / max(int(is_target.sum()), 1), dtype=torch.float64)
    loss, _ = chunked_loss.decoder_cross_entropy(model, corrupted, is_target, ids, weight,
                                                 attention_mask=attention_mask,
                                                 excluded_id=mask_id if exclude_mask_logit else None)
    return loss, is_target.sum()


def perplexity_blocks(texts: Sequence[str], tok, max_len: int = 512) -> torch.Tensor:
    """Concatenate every document with the tokenizer's framing and cut into [N, max_len] blocks;
    the tail shorter than a block is dropped (run_mlm), unless there is no full block."""
    ids = [i for text in texts for i in tok.encode(text, add_special_tokens=True)]
    if not ids:
        raise UserError("the perplexity source holds no tokens")
    usable = (len(ids) // max_len) * max_len if len(ids) >= max_len else len(ids)
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, min(max_len, usable))  # [N, S]


def mask_blocks(blocks: torch.Tensor, tok, *, mask_prob: float = 0.15, replace: bool = False,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(corrupted, is_target, maskable): mlm_corrupt of each block's non-special tokens, all
    blocks drawn at once on the CPU so the choice depends on the seed alone."""
    special = torch.tensor(sorted(tok.special_ids), dtype=torch.long)
    maskable = ~torch.isin(blocks, special)  # [N, S]
    corrupted, is_target = mlm_corrupt(blocks, tok.mask_id, maskable, mask_prob=mask_prob, replace=replace,
                                       vocab_size=tok.vocab_size, generator=torch.Generator().manual_seed(seed))
    return corrupted, is_target, maskable


@torch.no_grad()
def mlm_perplexity(model, tok, texts: Sequence[str], *, max_len: int = 512, mask_prob: float = 0.15,
                   replace: bool = False, seed: int = 0, batch_size: int = 8, nelbo: bool = True,
                   progress: bool = True) -> dict:
    """The paper's probe: exp(token-weighted mean CE at the masked positions); plus
    exp(NELBO / non-special tokens), the diffusion bound, with one t per block."""
    device = model_device(model)
    blocks = perplexity_blocks(texts, tok, max_len)
    corrupted, is_target, maskable = mask_blocks(blocks, tok, mask_prob=mask_prob, replace=replace, seed=seed)
    nelbo_gen = torch.Generator(device=device).manual_seed(seed + 1)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    nelbo_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in progress_bar(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
        rows = slice(start, start + batch_size)
        x0, xt, target, keep = (t[rows].to(device) for t in (blocks, corrupted, is_target, maskable))
        # sum_i CE_i, CE_i = -log softmax(logits_i)[x0_i] at the masked positions (full vocabulary)
        batch_ce, _ = chunked_loss.decoder_cross_entropy(model, xt, target, x0, torch.ones((), dtype=torch.float64))
        ce_sum += batch_ce.double()
        if nelbo:
            loss, _ = chunked_loss.nelbo_loss(model, x0, tok.mask_id, maskable=keep, schedule="linear",
                                              normalize="token", generator=nelbo_gen)
            # token-normalised loss x this batch's non-special tokens = the batch's NELBO sum
            nelbo_sum += loss.double() * keep.sum()
    n_masked, n_tokens = int(is_target.sum()), int(maskable.sum())
    if n_masked == 0:
        raise UserError(f"the perplexity source has only {n_tokens} non-special tokens; "
                        f"masking {mask_prob:.0%} of them leaves nothing to score")
    out = {"perplexity": math.exp(ce_sum.item() / n_masked), "n_masked": n_masked,
           "n_tokens": n_tokens, "n_blocks": len(blocks), "block_len": blocks.shape[1]}
    if nelbo:
        out["nelbo_perplexity"] = math.exp(nelbo_sum.item() / n_tokens)
    return out


# ----------------------------------------------------------------------------- one task
def run_task(model, tok, spec: TaskSpec, *, examples: Sequence[Example] | None = None,
             texts: Sequence[str] | None = None, mc_samples: int = DEFAULT_MC_SAMPLES, batch_size: int = 32,
             seed: int = 0, scoring: str = DEFAULT_SCORING, max_len: int = 512, mask_prob: float = 0.15,
             mlm_replace: bool = False, nelbo: bool = True, progress: bool = True,
             items_out: list | None = None) -> dict:
    """Evaluate one parsed task; returns {"kind", "title", "n", "metrics", "errors", "settings",
    ...}. The model's context (max_position_embeddings) bounds every sequence: perplexity
    blocks are clamped to it, multiple-choice prompts lose their left part after <bos>.
    `items_out`, if given, receives one dict per multiple-choice item (scores and errors)."""
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
                             "mlm_replace_80_10_10": mlm_replace, "mask_logit": "kept (as HF run_mlm)",
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
                         "draws": "per choice, from a generator seeded with seed",
                         "errors": "bootstrap over items x N(loglik, se^2) per choice, 1000 runs",
                         "framing": "<bos> prompt | ' ' + choice (no <eos>)"}}


# ----------------------------------------------------------------------------- tables
def _error(result: dict | None, metric: str) -> float | None:
    """The metric's total standard error, if the result has one."""
    return ((result or {}).get("errors") or {}).get(metric, {}).get("se")


def _cell(result: dict | None, metric: str, first: dict | None = None) -> str:
    """`value ± se` (x 100 unless a perplexity); with `first` (this run's result) a trailing
    `≈` when |value - first| is smaller than sqrt(se^2 + se_first^2)."""
    if result is None or metric not in result.get("metrics", {}):
        return "-"
    value = result["metrics"][metric]
    if metric.endswith("perplexity"):
        return f"{value:.2f}"
    error, other = _error(result, metric), _error(first, metric)
    text = f"{100 * value:.2f}" + ("" if error is None else f" ± {100 * error:.2f}")
    if first is not None and first is not result and metric in first.get("metrics", {}) and error is not None \
            and other is not None and abs(value - first["metrics"][metric]) < math.hypot(error, other):
        text += " ≈"
    return text


def _average(tasks: dict, keys: Sequence[str], metric: str) -> str:
    """mean over the tasks ± sqrt(sum se^2) / k (tasks independent); `(k/K)` if some miss."""
    have = [k for k in keys if k in tasks and metric in tasks[k]["metrics"]]
    if not have:
        return "-"
    text = f"{100 * sum(tasks[k]['metrics'][metric] for k in have) / len(have):.2f}"
    errors = [_error(tasks[k], metric) for k in have]
    if None not in errors:
        text += f" ± {100 * math.sqrt(sum(e * e for e in errors)) / len(have):.2f}"
    return text + ("" if len(have) == len(keys) else f" ({len(have)}/{len(keys)})")


def markdown_tables(columns: Sequence[tuple[str, dict]], metric: str = "acc") -> str:
    """Table 4 shape: the first run's multiple-choice tasks as rows, one column per run (`columns`:
    [(header, results["tasks"]), ...]), the average last; perplexity tasks in a table of their own."""
    lines: list[str] = []
    first = columns[0][1]  # rows: the tasks of the first column (this run)
    ppl_keys = [k for k, r in first.items() if r["kind"] == "perplexity"]
    if ppl_keys:
        lines += ["| perplexity | " + " | ".join(f"{h} (MLM) | {h} (NELBO bound)" for h, _ in columns) + " |",
                  "|---|" + "---:|---:|" * len(columns)]
        for key in ppl_keys:
            cells = [f"{_cell(t.get(key), 'perplexity')} | {_cell(t.get(key), 'nelbo_perplexity')}"
                     for _, t in columns]
            lines.append(f"| {first[key]['title']} | " + " | ".join(cells) + " |")
        lines.append("")
    mc_keys = [k for k, r in first.items() if r["kind"] == "mc"]
    if mc_keys:
        lines += [f"| task ({metric} x 100) | " + " | ".join(h for h, _ in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for key in mc_keys:
            cells = [_cell(t.get(key), metric, first[key]) for _, t in columns]
            lines.append(f"| {first[key]['title']} | " + " | ".join(cells) + " |")
        lines.append("| **Average** | " + " | ".join(_average(t, mc_keys, metric) for _, t in columns) + " |")
    return "\n".join(lines).strip()
