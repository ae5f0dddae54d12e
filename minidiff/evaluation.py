"""Evaluation: the paper's MLM perplexity probe and zero-shot multiple-choice benchmarks.

    tasks = [parse_task("belebele_tr:belebele_tur.jsonl"), parse_task("perplexity:essays.txt")]
    result = run_task(model, tok, tasks[0], mc_samples=32, seed=0)   # {"metrics": {"acc": ...}, ...}

Perplexity (SPEC §6, HF `run_mlm` style). Every document is encoded with the tokenizer's own
framing (`<bos> doc <eos>` for mmBERT), the documents are concatenated and cut into blocks of
`max_len` tokens (the tail shorter than a block is dropped, as run_mlm does, unless there is no
full block at all). In each block exactly floor(0.15 n + 0.5) of its n non-special tokens are
masked (specials never), chosen with a fixed seed; 80/10/10 replacement is off unless asked.
    perplexity = exp( sum_{masked i} -log p(x_i | corrupted block) / #masked )
over the whole vocabulary, `<mask>` logit included (run_mlm does not remove it). The second
column is the NELBO bound: exp(NELBO per non-special token), one t per block (linear schedule).

Multiple choice (SPEC §7, lm-eval-harness style). A task is data: a row -> (prompt, choices,
label). Prompt and `" " + choice` are tokenised separately WITHOUT special tokens and joined as
`<bos> prompt | choice` (only the choice is scored; no `<eos>`, since it would be scored too);
    loglik(choice) = log p(choice | prompt)   (diffusion.mc_loglik_many; exact for 1 token)
    acc = mean[argmax_c loglik(c) == label],  acc_norm = same with loglik(c) / len(c) (chars)
plus macro-F1 of the acc prediction for the classification tasks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import UserError

# ----------------------------------------------------------------------------- task definitions


@dataclass(frozen=True)
class Example:
    """One multiple-choice item: the prompt, the choice strings and the index of the right one."""

    prompt: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class TaskDef:
    """A multiple-choice benchmark as data (SPEC §7)."""

    name: str                       # --task name
    title: str                      # row name in the table (the paper's spelling)
    hub: str                        # hub dataset id, config, split (for the record)
    hub_uri: str                    # what data.read_rows is given when no file is passed
    required: tuple[str, ...]       # columns every row must have
    render: Callable[[dict], Example]
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    paper: tuple[float, float] | None = None  # (Diffutron 2nd stage, best baseline), acc x 100


def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"column {key!r} should hold text, got {type(value).__name__} {value!r}")
    return value


def _index(value, choices: Sequence[str], key: str) -> int:
    """A label as a choice index: an int, a digit string (CSV), or the choice's own text."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            value = int(text)
        else:
            names = [c.casefold() for c in choices]
            if text.casefold() in names:
                return names.index(text.casefold())
    if isinstance(value, int) and 0 <= value < len(choices):
        return value
    raise UserError(f"label {key!r} = {value!r} is not one of the {len(choices)} choices "
                    f"(expected an index 0..{len(choices) - 1} or one of {list(choices)})")


def render_belebele(row: dict) -> Example:
    """`P: {passage}\\nQ: {question}\\nA: ..\\nD: {a4}\\nAnswer:`; correct_answer_num is "1".."4"."""
    answers = [_text(row, f"mc_answer{i}") for i in (1, 2, 3, 4)]
    prompt = (f"P: {_text(row, 'flores_passage')}\nQ: {_text(row, 'question').strip()}\n"
              + "".join(f"{letter}: {a}\n" for letter, a in zip("ABCD", answers)) + "Answer:")
    raw = row["correct_answer_num"]
    number = str(raw).strip()
    if number not in ("1", "2", "3", "4"):
        raise UserError(f"label 'correct_answer_num' = {raw!r} is not one of 1, 2, 3, 4")
    return Example(prompt, ("A", "B", "C", "D"), int(number) - 1)


def render_belebele_cetvel(row: dict) -> Example:
    """The Turkish template of CETVEL's own belebele_tr.yaml (SPEC §7 gives lm-eval's English
    one): `Paragraf: {passage}\nSoru: {question}\nA: ..\nD: {a4}\nCevap:`."""
    example = render_belebele(row)
    head, _, rest = example.prompt.partition("\nQ: ")
    question, _, answers = rest.partition("\n")
    prompt = f"Paragraf: {head[3:]}\nSoru: {question}\n{answers[:-len('Answer:')]}Cevap:"
    return Example(prompt, example.choices, example.label)


def render_exams(row: dict) -> Example:
    """Prompt = question.stem, choices = question.choices.text; answerKey names a choice label.
    CETVEL's rule for a key missing from the labels (corrupted rows) is kept: index 3."""
    question = row["question"]
    if not isinstance(question, dict) or "stem" not in question or "choices" not in question:
        raise UserError("column 'question' should be an object with 'stem' and 'choices' "
                        "({'text': [...], 'label': [...]}) as in the exams dataset")
    choices = question["choices"]
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or not texts:
        raise UserError("column 'question.choices' should hold equal-length lists 'text' and 'label'")
    key = str(row["answerKey"]).lstrip()
    label = labels.index(key) if key in labels else 3
    if label >= len(texts):
        raise UserError(f"label 'answerKey' = {row['answerKey']!r} is not one of {labels}")
    return Example(str(question["stem"]), tuple(str(t) for t in texts), label)


IRONY_CHOICES = ("Hayır", "Evet")


def render_irony(row: dict) -> Example:
    """`Cümle: {text}\\nSoru: Bu cümlede ironi var mı?\\n`; label 0 non-ironic (Hayır), 1 ironic."""
    prompt = f"Cümle: {_text(row, 'text')}\nSoru: Bu cümlede ironi var mı?\n"
    return Example(prompt, IRONY_CHOICES, _index(row["label"], IRONY_CHOICES, "label"))


NEWS_CHOICES = ("spor", "magazin", "siyaset", "sağlık", "ekonomi")


def render_news(row: dict) -> Example:
    """`Cümle: {text}\\nSoru: Bu cümlenin konusu nedir?\\n Cevap:`; label an index or a name."""
    prompt = f"Cümle: {_text(row, 'text')}\nSoru: Bu cümlenin konusu nedir?\n Cevap:"
    return Example(prompt, NEWS_CHOICES, _index(row["label"], NEWS_CHOICES, "label"))


NLI_CHOICES = ("TUTARLI", "ALAKASIZ", "ÇELİŞKİLİ")  # entailment 0, neutral 1, contradiction 2


def render_mnli(row: dict) -> Example:
    prompt = ("Aşağıda iki cümle verilmektedir:\n\n"
              f"Cümle 1: \"{_text(row, 'premise')}\"\nCümle 2: \"{_text(row, 'hypothesis')}\"\n\n"
              "Bu iki cümle arasındaki ilişki nedir:")
    return Example(prompt, NLI_CHOICES, _index(row["label"], NLI_CHOICES, "label"))


STS_CHOICES = ("Benzerlik Yok", "Düşük Benzerlik", "Orta Benzerlik", "Yüksek Benzerlik",
               "Çok Yüksek Benzerlik", "Mantıksal Olarak Aynı")


def sts_bin(score: float) -> int:
    """The 0-5 similarity score in six bins: [0, .5) [.5, 1.5) [1.5, 2.5) [2.5, 3.5) [3.5, 4.5) [4.5, 5]."""
    return min(5, max(0, math.floor(score + 0.5)))


def render_sts(row: dict) -> Example:
    prompt = ("Aşağıda iki cümle verilmektedir:\n\n"
              f"Cümle 1: \"{_text(row, 'sentence1')}\"\nCümle 2: \"{_text(row, 'sentence2')}\"\n\n"
              "Bu iki cümle arasında ne kadar benzerlik vardır:")
    try:
        score = float(row["score"])
    except (TypeError, ValueError):
        raise UserError(f"column 'score' should be a number in 0..5, got {row['score']!r}") from None
    if not 0.0 <= score <= 5.0:
        raise UserError(f"column 'score' = {score} is outside the 0..5 similarity range")
    return Example(prompt, STS_CHOICES, sts_bin(score))


XCOPA_CONNECTORS = {"cause": "çünkü", "effect": "bu yüzden"}


def render_xcopa(row: dict) -> Example:
    """premise without its final period + " çünkü" (cause) / " bu yüzden" (effect); the two
    alternatives with their first letter lower-cased (lm-eval's xcopa_tr)."""
    question = _text(row, "question")
    if question not in XCOPA_CONNECTORS:
        raise UserError(f"column 'question' = {question!r} should be 'cause' or 'effect'")
    premise = _text(row, "premise").strip()
    premise = premise[:-1] if premise.endswith(".") else premise
    choices = tuple(c[:1].lower() + c[1:] for c in (_text(row, "choice1"), _text(row, "choice2")))
    return Example(f"{premise} {XCOPA_CONNECTORS[question]}", choices,
                   _index(row["label"], choices, "label"))


def render_generic(row: dict) -> Example:
    """A user task: {"prompt": str, "choices": [str, ...], "label": int}."""
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise UserError("column 'choices' should be a list of at least two strings")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise UserError(f"label {label!r} is not an index into the {len(choices)} choices")
    return Example(_text(row, "prompt"), tuple(choices), label)


F1 = ("acc", "acc_norm", "macro_f1")
TASKS: dict[str, TaskDef] = {t.name: t for t in [
    TaskDef("belebele_tr", "Belebele_TR", "facebook/belebele tur_Latn, test",
            "hf://datasets/facebook/belebele/data/tur_Latn.jsonl",
            ("flores_passage", "question", "mc_answer1", "mc_answer2", "mc_answer3", "mc_answer4",
             "correct_answer_num"), render_belebele, paper=(27.00, 55.78)),
    TaskDef("belebele_tr_cetvel", "Belebele_TR (CETVEL prompt)", "facebook/belebele tur_Latn, test",
            "hf://datasets/facebook/belebele/data/tur_Latn.jsonl",
            ("flores_passage", "question", "mc_answer1", "mc_answer2", "mc_answer3", "mc_answer4",
             "correct_answer_num"), render_belebele_cetvel),
    TaskDef("exams_tr", "EXAMS_TR", "exams (mhardalov/exams) crosslingual_tr, validation",
            "hf://datasets/mhardalov/exams/crosslingual_tr/validation-00000-of-00001.parquet",
            ("question", "answerKey"), render_exams, paper=(27.74, 30.03)),
    TaskDef("ironytr", "IronyTR", "mcemilg/IronyTR, validation",
            "hf://datasets/mcemilg/IronyTR/val.csv", ("text", "label"), render_irony, F1,
            paper=(52.00, 52.17)),
    TaskDef("news_cat", "News_Cat", "mcemilg/news-cat, test",
            "hf://datasets/mcemilg/news-cat/test.jsonl", ("text", "label"), render_news, F1,
            paper=(32.40, 81.20)),
    TaskDef("mnli_tr", "MNLI_TR", "nli_tr (boun-tabi/nli_tr) multinli_tr, validation_matched",
            "hf://datasets/boun-tabi/nli_tr/multinli_tr/validation_matched-00000-of-00001.parquet",
            ("premise", "hypothesis", "label"), render_mnli, F1, paper=(32.81, 36.42)),
    TaskDef("sts_tr", "STS_TR", "emrecan/stsb-mt-turkish, test",
            "hf://datasets/emrecan/stsb-mt-turkish/test.csv",
            ("sentence1", "sentence2", "score"), render_sts, F1, paper=(18.78, 18.78)),
    TaskDef("xcopa_tr", "XCOPA_TR", "xcopa (cambridgeltl/xcopa) tr, test",
            "hf://datasets/cambridgeltl/xcopa/tr/test-00000-of-00001.parquet",
            ("premise", "choice1", "choice2", "question", "label"), render_xcopa,
            paper=(52.00, 64.20)),
]}
GENERIC = TaskDef("mc", "mc", "user file", "", ("prompt", "choices", "label"), render_generic)


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
    from . import data

    task = spec.task
    source = spec.source or task.hub_uri
    if spec.source and not source.startswith("hf://") and not Path(source).exists():
        raise UserError(f"--task {spec.key}: file {source} does not exist")
    try:
        rows = data.read_rows(source)
    except UserError as err:
        raise UserError(f"--task {spec.key}: {err}") from None
    except (OSError, ConnectionError) as err:  # offline, or the hub refused
        raise UserError(f"--task {spec.key}: could not read {source} ({type(err).__name__}); "
                        f"offline? pass a local file as --task {task.name}:FILE") from None
    problems = getattr(rows, "problems", None)
    if problems:  # a benchmark is scored on every row or not at all
        raise UserError(f"--task {spec.key}: {problems[0]} ({len(problems)} unreadable line(s) in "
                        f"{source}); fix or remove them")
    if limit is not None:
        rows = rows[:limit]
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


def choice_pairs(tok, example: Example) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per choice: `<bos>` + prompt and `" " + choice`, each tokenised
    alone without special tokens, so no special token ever sits inside the scored answer."""
    prompt = tok.encode(example.prompt, add_special_tokens=False)
    if tok.bos_id is not None:
        prompt = [tok.bos_id] + prompt
    pairs = []
    for choice in example.choices:
        answer = tok.encode(" " + choice, add_special_tokens=False)
        if not answer:
            raise UserError(f"choice {choice!r} tokenises to nothing")
        pairs.append((prompt, answer))
    return pairs


def score_examples(model, tok, examples: Sequence[Example], *, mc_samples: int = 32,
                   batch_size: int = 32, seed: int = 0, rows_per_step: int = 64,
                   progress: bool = True, desc: str = "mc") -> list[list[float]]:
    """log p(" " + choice | prompt) for every choice of every example, batched across choices
    and rows. One-token answers use one sample (it is exact); longer ones `mc_samples`."""
    from tqdm.auto import tqdm

    from . import diffusion

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    scores: list[list[float]] = []
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, unit="row")
    for start in range(0, len(examples), rows_per_step):
        chunk = examples[start:start + rows_per_step]
        pairs = [pair for ex in chunk for pair in choice_pairs(tok, ex)]
        values = [0.0] * len(pairs)
        for single in (True, False):
            index = [i for i, (_, answer) in enumerate(pairs) if (len(answer) == 1) == single]
            if not index:
                continue
            got = diffusion.mc_loglik_many(
                model, [pairs[i] for i in index], tok.mask_id, pad_id=tok.pad_id,
                num_samples=1 if single else mc_samples, batch_size=batch_size, generator=generator)
            for i, value in zip(index, got):
                values[i] = float(value)
        offset = 0
        for ex in chunk:
            scores.append(values[offset:offset + len(ex.choices)])
            offset += len(ex.choices)
        bar.update(len(chunk))
    bar.close()
    return scores


def macro_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Unweighted mean over the classes seen in gold or pred of 2 tp / (2 tp + fp + fn)."""
    classes = sorted(set(gold) | set(pred))
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / len(f1s)


def mc_metrics(examples: Sequence[Example], scores: Sequence[Sequence[float]],
               metrics: Sequence[str] = F1) -> dict[str, float]:
    """acc (argmax of loglik), acc_norm (argmax of loglik / characters of the choice), macro_f1."""
    def argmax(values):
        return max(range(len(values)), key=lambda i: (values[i], -i))  # first of ties

    gold = [ex.label for ex in examples]
    pred = [argmax(s) for s in scores]
    pred_norm = [argmax([v / len(c) for v, c in zip(s, ex.choices)]) for s, ex in zip(scores, examples)]
    out = {"acc": sum(p == g for p, g in zip(pred, gold)) / len(gold),
           "acc_norm": sum(p == g for p, g in zip(pred_norm, gold)) / len(gold)}
    if "macro_f1" in metrics:
        out["macro_f1"] = macro_f1(gold, pred)
    return out


# ----------------------------------------------------------------------------- perplexity


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
    """(corrupted, is_target, maskable): exactly floor(p n + 0.5) of each block's n non-special
    tokens become targets (diffusion.mlm_corrupt), all blocks drawn at once on the CPU so the
    choice depends only on the seed, not on the batch size or device."""
    from . import diffusion

    special = torch.tensor(sorted(tok.special_ids), dtype=torch.long)
    maskable = ~torch.isin(blocks, special)                                         # [N, S]
    generator = torch.Generator().manual_seed(seed)
    corrupted, is_target = diffusion.mlm_corrupt(
        blocks, tok.mask_id, maskable, mask_prob=mask_prob, replace=replace,
        vocab_size=tok.vocab_size, generator=generator)
    return corrupted, is_target, maskable


@torch.no_grad()
def mlm_perplexity(model, tok, texts: Sequence[str], *, max_len: int = 512, mask_prob: float = 0.15,
                   replace: bool = False, seed: int = 0, batch_size: int = 8, nelbo: bool = True,
                   progress: bool = True) -> dict:
    """The paper's probe: exp(token-weighted mean CE at the masked positions); plus
    exp(NELBO / non-special tokens), the diffusion bound, with one t per block."""
    from tqdm.auto import tqdm

    from . import diffusion

    device = next(model.parameters()).device
    blocks = perplexity_blocks(texts, tok, max_len)
    corrupted, is_target, maskable = mask_blocks(blocks, tok, mask_prob=mask_prob, replace=replace, seed=seed)
    nelbo_gen = torch.Generator(device=device).manual_seed(seed + 1)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    nelbo_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", disable=not progress):
        x0 = blocks[start:start + batch_size].to(device)
        xt = corrupted[start:start + batch_size].to(device)
        target = is_target[start:start + batch_size].to(device)
        # sum_i CE_i, CE_i = -log softmax(logits_i)[x0_i] at the masked positions (full vocabulary)
        flat_index, _, targets = diffusion.selected_positions(target, x0)  # [N] each
        ones = torch.ones_like(targets, dtype=torch.float64)  # [N]
        batch_ce, _ = diffusion.decoder_cross_entropy(model, xt, target, flat_index, targets, ones)
        ce_sum += batch_ce.double()
        if nelbo:
            keep = maskable[start:start + batch_size].to(device)
            loss, _ = diffusion.nelbo_loss(model, x0, tok.mask_id, maskable=keep, schedule="linear",
                                           normalize="token", generator=nelbo_gen)
            # token-normalised loss x this batch's non-special tokens = the batch's NELBO sum
            nelbo_sum += loss.double() * keep.sum()
    n_masked = int(is_target.sum())
    n_tokens = int(maskable.sum())
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
             texts: Sequence[str] | None = None, mc_samples: int = 32, batch_size: int = 32,
             seed: int = 0, max_len: int = 512, mask_prob: float = 0.15, mlm_replace: bool = False,
             nelbo: bool = True, progress: bool = True) -> dict:
    """Evaluate one parsed task; returns {"kind", "title", "n", "metrics", "settings", ...}."""
    if spec.kind == "perplexity":
        probe = mlm_perplexity(model, tok, texts, max_len=max_len, mask_prob=mask_prob,
                               replace=mlm_replace, seed=seed, batch_size=batch_size, nelbo=nelbo,
                               progress=progress)
        metrics = {k: probe[k] for k in ("perplexity", "nelbo_perplexity") if k in probe}
        title = spec.source if spec.source.startswith("hf://") else Path(spec.source).name
        return {"kind": "perplexity", "title": title,
                "source": spec.source, "n": probe["n_masked"], "metrics": metrics,
                "n_tokens": probe["n_tokens"], "n_blocks": probe["n_blocks"],
                "settings": {"max_len": max_len, "block_len": probe["block_len"],
                             "mask_prob": mask_prob, "mask_count": "floor(p*n + 0.5) per block",
                             "mlm_replace_80_10_10": mlm_replace, "mask_logit": "kept (as HF run_mlm)",
                             "framing": "tokenizer post-processor per document", "seed": seed,
                             "nelbo": "linear schedule, one t per block, / non-special tokens"}}
    scores = score_examples(model, tok, examples, mc_samples=mc_samples, batch_size=batch_size,
                            seed=seed, progress=progress, desc=spec.key)
    title = spec.task.title if spec.task is not GENERIC else Path(spec.source).name
    return {"kind": "mc", "title": title, "source": spec.source or spec.task.hub_uri,
            "n": len(examples), "metrics": mc_metrics(examples, scores, spec.task.metrics),
            "settings": {"mc_samples": mc_samples, "one_token_samples": 1, "batch_size": batch_size,
                         "seed": seed, "framing": "<bos> prompt | ' ' + choice (no <eos>)"}}


# ----------------------------------------------------------------------------- tables


def _cell(result: dict | None, metric: str) -> str:
    if result is None or metric not in result.get("metrics", {}):
        return "-"
    value = result["metrics"][metric]
    return f"{value:.2f}" if metric.endswith("perplexity") else f"{100 * value:.2f}"


def markdown_tables(columns: Sequence[tuple[str, dict]], metric: str = "acc") -> str:
    """Table 4 shape: the first run's multiple-choice tasks as rows, one column per run, the
    average last (a column missing some rows says over how many); perplexity tasks in a table
    of their own. `columns`: [(header, results["tasks"]), ...]."""
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
            cells = [_cell(t.get(key), metric) for _, t in columns]
            lines.append(f"| {first[key]['title']} | " + " | ".join(cells) + " |")
        averages = []
        for _, tasks in columns:
            values = [tasks[k]["metrics"][metric] for k in mc_keys if k in tasks and metric in tasks[k]["metrics"]]
            mark = "" if len(values) == len(mc_keys) else f" ({len(values)}/{len(mc_keys)})"
            averages.append(f"{100 * sum(values) / len(values):.2f}{mark}" if values else "-")
        lines.append("| **Average** | " + " | ".join(averages) + " |")
    return "\n".join(lines).strip()
