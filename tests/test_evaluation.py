"""minidiff.evaluation.scoring and .perplexity: task rendering (hand-written rows in each dataset's own schema, compared
with hand-written prompts), token boundaries, scoring with a model crafted to prefer a known
answer, metrics against hand-computed values, and the perplexity probe against a direct
recomputation from full logits."""
from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
from helpers import BOS, EOS, MASK, TURKISH_TEXT, make_model_dir
from test_evaluate_cli import evaluate_script
from tokenizers import Tokenizer

import minidiff
from minidiff.errors import UserError
from minidiff.evaluation import perplexity
from minidiff.evaluation import scoring as evaluation
from minidiff.evaluation.scoring import Example, parse_task
from minidiff.evaluation.tasks import sts_bin

# ----------------------------------------------------------------------------- fixture files
# A few rows per dataset, written by hand in the hub dataset's own column layout.

BELEBELE = [
    {"link": "https://en.wikibooks.org/wiki/Accordion", "question_number": 1, "dialect": "tur_Latn",
     "flores_passage": "Ankara 1923 yılında başkent oldu. Şehir hızla büyüdü.",
     "question": " Ankara ne zaman başkent oldu? ", "mc_answer1": "1920", "mc_answer2": "1923",
     "mc_answer3": "1930", "mc_answer4": "1950", "correct_answer_num": "2", "ds": "2023-05-03"},
    {"link": "x", "question_number": 2, "dialect": "tur_Latn",
     "flores_passage": "Martılar denizin üzerinde uçuyordu.", "question": "Martılar nerede uçuyordu?",
     "mc_answer1": "Dağda", "mc_answer2": "Ormanda", "mc_answer3": "Şehirde",
     "mc_answer4": "Denizin üzerinde", "correct_answer_num": "4", "ds": "2023-05-03"},
]
BELEBELE_PROMPTS = [
    "P: Ankara 1923 yılında başkent oldu. Şehir hızla büyüdü.\nQ: Ankara ne zaman başkent oldu?\n"
    "A: 1920\nB: 1923\nC: 1930\nD: 1950\nAnswer:",
    "P: Martılar denizin üzerinde uçuyordu.\nQ: Martılar nerede uçuyordu?\n"
    "A: Dağda\nB: Ormanda\nC: Şehirde\nD: Denizin üzerinde\nAnswer:",
]

EXAMS = [
    {"id": "tr-1", "question": {"stem": "Türkiye'nin başkenti neresidir?",
                                "choices": {"text": ["İstanbul", "Ankara", "İzmir", "Bursa"],
                                            "label": ["A", "B", "C", "D"]}},
     "answerKey": "B", "info": {"grade": 12, "subject": "Coğrafya", "language": "Turkish"}},
    {"id": "tr-2", "question": {"stem": "Işığın hızı yaklaşık kaç km/s'dir?",
                                "choices": {"text": ["300.000", "25", "17", "8"],
                                            "label": ["A", "B", "C", "D"]}},
     "answerKey": " A", "info": {"grade": 12, "subject": "Fizik", "language": "Turkish"}},
]

IRONY = [  # IronyTR's val.csv: text,label (0 non-ironic, 1 ironic)
    {"text": "Harika, yine yağmur yağıyor, tam piknik havası!", "label": "1"},
    {"text": "Bugün okula gittim.", "label": "0"},
]

NEWS = [
    {"text": "Takım dün akşamki maçı iki golle kazandı.", "label": 0},
    {"text": "Hastanelerde yeni aşı dönemi başladı.", "label": "sağlık"},
    {"text": "Merkez bankası faiz kararını açıkladı.", "label": 4},
]

MNLI = [
    {"idx": 0, "premise": "Çocuklar bahçede oynuyor.", "hypothesis": "Çocuklar dışarıda.", "label": 0},
    {"idx": 1, "premise": "Adam kitap okuyor.", "hypothesis": "Adam uyuyor.", "label": 2},
    {"idx": 2, "premise": "Kadın yürüyor.", "hypothesis": "Kadın markete gidiyor.", "label": 1},
]

STS = [  # emrecan/stsb-mt-turkish test.csv: sentence1,sentence2,score
    {"sentence1": "Bir kedi uyuyor.", "sentence2": "Bir uçak kalkıyor.", "score": "0.2"},
    {"sentence1": "Adam gitar çalıyor.", "sentence2": "Bir adam müzik yapıyor.", "score": "2.0"},
    {"sentence1": "Kadın koşuyor.", "sentence2": "Kadın koşuyor.", "score": "5.0"},
]

XCOPA = [
    {"premise": "Adam yere düştü.", "choice1": "Buz üzerinde kaydı.", "choice2": "Şarkı söyledi.",
     "question": "cause", "label": 0, "idx": 1, "changed": False},
    {"premise": "Hava çok soğuktu.", "choice1": "Denize girdik.", "choice2": "Montumu giydim.",
     "question": "effect", "label": 1, "idx": 2, "changed": False},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows):
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def task_files(tmp_path):
    belebele = write_jsonl(tmp_path / "belebele_tur_Latn.jsonl", BELEBELE)
    return {
        "belebele_tr": belebele,
        "belebele_tr_cetvel": belebele,
        "exams_tr": write_jsonl(tmp_path / "exams_crosslingual_tr_validation.jsonl", EXAMS),
        "ironytr": write_csv(tmp_path / "val.csv", IRONY),
        "news_cat": write_jsonl(tmp_path / "test.jsonl", NEWS),
        "mnli_tr": write_jsonl(tmp_path / "multinli_tr_validation_matched.jsonl", MNLI),
        "sts_tr": write_csv(tmp_path / "test.csv", STS),
        "xcopa_tr": write_jsonl(tmp_path / "xcopa_tr_test.jsonl", XCOPA),
    }


def load(name, path, limit=None):
    return evaluation.load_examples(parse_task(f"{name}:{path}"), limit)


# ----------------------------------------------------------------------------- rendering


def test_belebele_prompts_and_labels(task_files):
    examples = load("belebele_tr", task_files["belebele_tr"])
    assert [e.prompt for e in examples] == BELEBELE_PROMPTS
    assert all(e.choices == ("A", "B", "C", "D") for e in examples)
    assert [e.label for e in examples] == [1, 3]


def test_belebele_with_cetvels_turkish_prompt(task_files):
    (example,) = load("belebele_tr_cetvel", task_files["belebele_tr"], limit=1)
    assert example == Example(
        "Paragraf: Ankara 1923 yılında başkent oldu. Şehir hızla büyüdü.\nSoru: Ankara ne zaman başkent oldu?\n"
        "A: 1920\nB: 1923\nC: 1930\nD: 1950\nCevap:", ("A", "B", "C", "D"), 1)


def test_exams_prompts_and_labels(task_files):
    examples = load("exams_tr", task_files["exams_tr"])
    assert examples[0] == Example("Türkiye'nin başkenti neresidir?", ("İstanbul", "Ankara", "İzmir", "Bursa"), 1)
    assert examples[1] == Example("Işığın hızı yaklaşık kaç km/s'dir?", ("300.000", "25", "17", "8"), 0)


def test_irony_prompts_and_labels(task_files):
    examples = load("ironytr", task_files["ironytr"])
    assert examples[0] == Example(
        "Cümle: Harika, yine yağmur yağıyor, tam piknik havası!\nSoru: Bu cümlede ironi var mı?\n",
        ("Hayır", "Evet"), 1)
    assert examples[1] == Example("Cümle: Bugün okula gittim.\nSoru: Bu cümlede ironi var mı?\n",
                                  ("Hayır", "Evet"), 0)


def test_news_prompts_and_labels(task_files):
    examples = load("news_cat", task_files["news_cat"])
    choices = ("spor", "magazin", "siyaset", "sağlık", "ekonomi")
    assert examples[0] == Example(
        "Cümle: Takım dün akşamki maçı iki golle kazandı.\nSoru: Bu cümlenin konusu nedir?\n Cevap:", choices, 0)
    assert examples[1].label == 3 and examples[2].label == 4  # a name and an index


def test_mnli_prompts_and_labels(task_files):
    examples = load("mnli_tr", task_files["mnli_tr"])
    assert examples[1] == Example(
        'Aşağıda iki cümle verilmektedir:\n\nCümle 1: "Adam kitap okuyor."\nCümle 2: "Adam uyuyor."\n\n'
        "Bu iki cümle arasındaki ilişki nedir:", ("TUTARLI", "ALAKASIZ", "ÇELİŞKİLİ"), 2)
    assert [e.label for e in examples] == [0, 2, 1]


def test_sts_prompts_and_bins(task_files):
    examples = load("sts_tr", task_files["sts_tr"])
    assert examples[0] == Example(
        'Aşağıda iki cümle verilmektedir:\n\nCümle 1: "Bir kedi uyuyor."\nCümle 2: "Bir uçak kalkıyor."\n\n'
        "Bu iki cümle arasında ne kadar benzerlik vardır:",
        ("Benzerlik Yok", "Düşük Benzerlik", "Orta Benzerlik", "Yüksek Benzerlik",
         "Çok Yüksek Benzerlik", "Mantıksal Olarak Aynı"), 0)
    assert [e.label for e in examples] == [0, 2, 5]
    # bin edges: < 0.5 none ... >= 4.5 the same
    edges = {0.0: 0, 0.49: 0, 0.5: 1, 1.49: 1, 1.5: 2, 2.5: 3, 3.49: 3, 3.5: 4, 4.49: 4, 4.5: 5, 5.0: 5}
    assert {s: sts_bin(s) for s in edges} == edges


def test_xcopa_prompts_and_choices(task_files):
    examples = load("xcopa_tr", task_files["xcopa_tr"])
    assert examples[0] == Example("Adam yere düştü çünkü", ("buz üzerinde kaydı.", "şarkı söyledi."), 0)
    assert examples[1] == Example("Hava çok soğuktu bu yüzden", ("denize girdik.", "montumu giydim."), 1)


def test_generic_task_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "2 + 2 =", "choices": ["3", "4"], "label": 1},
                                                 {"prompt": "Gök", "choices": ["mavi", "yeşil"], "label": 0}])
    assert evaluation.load_examples(parse_task(f"mc:{path}"), 1) == [Example("2 + 2 =", ("3", "4"), 1)]


@pytest.mark.parametrize("rows, words", [
    ([{"prompt": "p", "choices": ["a", "b"]}], "lacks ['label']"),
    ([{"prompt": "p", "choices": ["a", "b"], "label": 2}], "not an index"),
    ([{"prompt": "p", "choices": ["a"], "label": 0}], "at least two"),
])
def test_generic_bad_rows(tmp_path, rows, words):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
        evaluation.load_examples(parse_task(f"mc:{path}"))


def test_dataset_label_outside_choices(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [dict(MNLI[0], label=3)])
    with pytest.raises(UserError, match="not one of the 3 choices"):
        load("mnli_tr", path)
    path = write_jsonl(tmp_path / "b.jsonl", [dict(BELEBELE[0], correct_answer_num="5")])
    with pytest.raises(UserError, match="not one of 1, 2, 3, 4"):
        load("belebele_tr", path)


def test_unknown_task_is_one_sentence():
    with pytest.raises(UserError, match="not a known task") as err:
        parse_task("hellaswag_tr")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- token boundaries


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="module")
def tok(model_dir):
    return minidiff.load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def raw_tok(model_dir):
    """The tokenizers library itself: the independent reference for token ids."""
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def test_single_letter_choices_are_distinct_and_special_free(task_files, tok, raw_tok):
    example = load("belebele_tr", task_files["belebele_tr"])[0]
    pairs = evaluation.choice_pairs(tok, example)
    answers = [tuple(a) for _, a in pairs]
    assert len(set(answers)) == 4
    specials = {0, 1, 2, 3, 4}
    for (prompt, answer), letter in zip(pairs, "ABCD"):
        assert not specials & set(answer)
        assert answer == raw_tok.encode(" " + letter, add_special_tokens=False).ids
        # the prompt: <bos> then the prompt's own tokens, no <eos> or other special inside
        assert prompt == [BOS] + raw_tok.encode(example.prompt, add_special_tokens=False).ids
        assert not specials & set(prompt[1:])


# ----------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def model(model_dir):
    return minidiff.load_model(model_dir).eval()


def prefer(model, token_ids, base, boost=1e4):
    """The crafted model: the decoder bias raised by `boost` on `token_ids`, so an answer made of
    them is far more likely than any answer holding a token outside them."""
    with torch.no_grad():
        model.decoder.bias.copy_(base)
        model.decoder.bias[list(token_ids)] += boost


@pytest.mark.parametrize("name", [n for n in evaluation.TASKS if n != "belebele_tr_cetvel"])
def test_crafted_model_scores_every_row_correctly(name, task_files, model, tok):
    examples = load(name, task_files[name], limit=2)  # two rows, two different gold answers
    base = model.decoder.bias.detach().clone()
    try:
        for example in examples:
            pairs = evaluation.choice_pairs(tok, example)
            gold = set(pairs[example.label][1])
            # fixture rows are chosen so that every wrong choice has a token outside the gold's
            assert all(set(a) - gold for i, (_, a) in enumerate(pairs) if i != example.label)
            prefer(model, gold, base)
            scores = evaluation.score_examples(model, tok, [example], mc_samples=8, progress=False)
            metrics = evaluation.mc_metrics([example], scores)
            assert metrics["acc"] == 1.0 and metrics["acc_norm"] == 1.0, (example, scores)
    finally:
        with torch.no_grad():
            model.decoder.bias.copy_(base)


def test_one_token_answer_is_exact(task_files, model, tok, raw_tok):
    """Belebele letters: log p(" B" | <bos> prompt) from one forward pass written here."""
    example = load("belebele_tr", task_files["belebele_tr"])[0]
    scores = evaluation.score_examples(model, tok, [example], mc_samples=32, progress=False)[0]
    prompt = [BOS] + raw_tok.encode(example.prompt, add_special_tokens=False).ids
    checked = 0
    for letter, score in zip("ABCD", scores):
        answer = raw_tok.encode(" " + letter, add_special_tokens=False).ids
        if len(answer) != 1:  # the tiny tokenizer splits some letters into "▁" + letter
            continue
        (answer,) = answer
        checked += 1
        with torch.no_grad():
            logits = model(torch.tensor([prompt + [MASK]]))[0, -1].double()
        logits[MASK] = -math.inf  # the diffusion model never predicts <mask>
        assert score == pytest.approx(torch.log_softmax(logits, -1)[answer].item(), abs=1e-4)
    assert checked >= 2


def test_metrics_against_hand_counts():
    examples = [Example("p", ("a", "bbbb"), 1), Example("p", ("a", "bbbb"), 0),
                Example("p", ("a", "bbbb"), 1), Example("p", ("a", "bbbb"), 1)]
    scores = [[-1.0, -2.0], [-1.0, -2.0], [-3.0, -2.0], [-1.0, -3.0]]
    # acc: preds 0, 0, 1, 0 vs gold 1, 0, 1, 1 -> 2/4.  acc_norm (/1 char, /4 chars):
    # [-1, -0.5] [-1, -0.5] [-3, -0.5] [-1, -0.75] -> preds 1, 1, 1, 1 -> 3/4
    # macro-F1 of acc preds: class 0 tp1 fp2 fn0 -> 2/4; class 1 tp1 fp0 fn2 -> 2/4; mean 0.5
    assert evaluation.mc_metrics(examples, scores) == {"acc": 0.5, "acc_norm": 0.75, "macro_f1": 0.5}
    # a class never predicted counts with F1 0: gold 0,1,2 preds 0,0,0 -> (2/4 + 0 + 0) / 3
    assert evaluation.macro_f1([0, 1, 2], [0, 0, 0]) == pytest.approx(1 / 6)


# ----------------------------------------------------------------------------- perplexity


def test_blocks_are_the_framed_documents_cut_in_order(tok, raw_tok):
    blocks = perplexity.perplexity_blocks(TURKISH_TEXT, tok, max_len=32)
    stream = [i for t in TURKISH_TEXT for i in raw_tok.encode(t).ids]  # <bos> doc <eos> each
    assert stream[0] == BOS and stream[-1] == EOS
    full = len(stream) // 32
    assert blocks.shape == (full, 32)
    assert blocks.flatten().tolist() == stream[: full * 32]
    # fewer tokens than one block: the one short block is kept
    short = perplexity.perplexity_blocks(TURKISH_TEXT[:1], tok, max_len=512)
    assert short.flatten().tolist() == raw_tok.encode(TURKISH_TEXT[0]).ids


def test_masking_is_exactly_15_percent_of_non_special_tokens(tok):
    blocks = perplexity.perplexity_blocks(TURKISH_TEXT * 3, tok, max_len=40)
    corrupted, target, maskable = perplexity.mask_blocks(blocks, tok, seed=3)
    special = (blocks <= 4)  # pad eos bos unk mask
    assert torch.equal(maskable, ~special)
    for row in range(blocks.shape[0]):
        n = int((~special[row]).sum())
        assert int(target[row].sum()) == (15 * n + 50) // 100  # floor(0.15 n + 0.5), in integers
    assert not (target & special).any()
    assert torch.equal(corrupted[target], torch.full_like(corrupted[target], MASK))
    assert torch.equal(corrupted[~target], blocks[~target])
    # the seed fixes the choice; another seed changes it
    assert torch.equal(perplexity.mask_blocks(blocks, tok, seed=3)[1], target)
    assert not torch.equal(perplexity.mask_blocks(blocks, tok, seed=4)[1], target)


def test_perplexity_matches_a_direct_recomputation(model, tok):
    result = perplexity.mlm_perplexity(model, tok, TURKISH_TEXT, max_len=32, seed=5, batch_size=3,
                                       progress=False)
    again = perplexity.mlm_perplexity(model, tok, TURKISH_TEXT, max_len=32, seed=5, batch_size=7,
                                      nelbo=False, progress=False)
    repeat = perplexity.mlm_perplexity(model, tok, TURKISH_TEXT, max_len=32, seed=5, batch_size=3,
                                       progress=False)
    assert repeat == result  # deterministic for a seed (and batch size: the NELBO's t draws)
    # the masks do not depend on the batch size, so the MLM column agrees up to float rounding
    assert again["perplexity"] == pytest.approx(result["perplexity"], rel=1e-5)
    blocks = perplexity.perplexity_blocks(TURKISH_TEXT, tok, max_len=32)
    corrupted, target, _ = perplexity.mask_blocks(blocks, tok, seed=5)
    # direct: full logits of every corrupted block, the <mask> column cut out of the vocabulary (as
    # the training loss), softmax over the rest, -log p of the original token at each chosen
    # position (ids above <mask> one place lower), plain mean
    with torch.no_grad():
        logits = model(corrupted).double()  # [N, S, V]
    probs = torch.softmax(torch.cat([logits[..., :MASK], logits[..., MASK + 1:]], dim=-1), dim=-1)  # [N, S, V-1]
    column = [int(x) - (int(x) > MASK) for x in blocks.flatten()]  # id -> its column without <mask>
    nll = [-math.log(probs[b, s, column[b * blocks.shape[1] + s]].item()) for b, s in target.nonzero().tolist()]
    assert result["n_masked"] == len(nll)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert math.isfinite(result["nelbo_perplexity"]) and result["nelbo_perplexity"] > 1.0


def test_nelbo_column_is_the_token_normalised_bound(model, tok):
    """One batch holding every block: the column is exp(nelbo_loss(normalize="token"))."""
    from minidiff import diffusion

    result = perplexity.mlm_perplexity(model, tok, TURKISH_TEXT, max_len=32, seed=2, batch_size=1000,
                                       progress=False)
    blocks = perplexity.perplexity_blocks(TURKISH_TEXT, tok, max_len=32)
    with torch.no_grad():
        loss, _ = diffusion.nelbo_loss(model, blocks, MASK, maskable=blocks > 4, normalize="token",
                                       generator=torch.Generator().manual_seed(3))
    assert result["nelbo_perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-6)


def test_a_choice_score_does_not_depend_on_the_other_rows(task_files, model, tok):
    """Every item draws from a generator seeded with item_seed(seed, prompt): scoring a row alone
    or with others gives the same numbers, each equal to diffusion.mc_loglik with that seed."""
    from minidiff import diffusion
    from minidiff.evaluation.answers import item_seed

    examples = load("mnli_tr", task_files["mnli_tr"])
    together = evaluation.score_examples(model, tok, examples, mc_samples=4, seed=9, progress=False)
    alone = evaluation.score_examples(model, tok, examples[2:], mc_samples=4, seed=9, progress=False)
    assert alone[0] == pytest.approx(together[2], abs=1e-4)
    for (prompt, answer), value in zip(evaluation.choice_pairs(tok, examples[2]), together[2]):
        reference = diffusion.mc_loglik(model, prompt, answer, MASK, num_samples=1 if len(answer) == 1 else 4,
                                        generator=torch.Generator().manual_seed(item_seed(9, examples[2].prompt)))
        assert value == pytest.approx(reference, abs=1e-4)


class MaskRecorder(torch.nn.Module):
    """Logits from `model` (not a ModernBertMLM, so the dense path); records every input row."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.rows = model, model.config, []

    def forward(self, input_ids, attention_mask=None, logits_at=None):
        self.rows += input_ids.tolist()
        return self.model(input_ids, attention_mask, logits_at=logits_at)


def test_items_draw_independent_masks_whatever_the_batching(model, tok):
    """Two items whose answers have the same length: different l_j and masked positions (each
    item its own stream); the scores are the same for any batch size and rows per step."""
    items = [Example("Kedi", ("miyavlar", "havlar"), 0), Example("Köpek", ("miyavlar", "havlar"), 1)]
    answers_of = [[answer for _, answer in evaluation.choice_pairs(tok, ex)] for ex in items]
    assert len(answers_of[0][0]) > 1 and answers_of[0] == answers_of[1]  # the same answers, L > 1
    recorder, n = MaskRecorder(model), 6
    first = evaluation.score_items(recorder, tok, items, mc_samples=n, scoring="mc", batch_size=100, progress=False)
    L = len(answers_of[0][0])
    masks = [[tuple(token == MASK for token in row if token != tok.pad_id)[-L:] for row in rows]
             for rows in (recorder.rows[:n], recorder.rows[2 * n:3 * n])]  # choice 0 of each item
    assert len(recorder.rows) == 4 * n and masks[0] != masks[1]
    for batch_size, rows_per_step in ((1, 64), (5, 1), (7, 2)):
        again = evaluation.score_items(model, tok, items, mc_samples=n, scoring="mc", batch_size=batch_size,
                                       rows_per_step=rows_per_step, progress=False)
        for got, want in ((again.scores, first.scores), (again.errors, first.errors)):
            assert sum(got, []) == pytest.approx(sum(want, []), abs=1e-5)


# ----------------------------------------------------------------------------- error bars

SUFFIX_ITEMS = [Example(f"{stem} gördük ve", (f"{stem}ler", f"{stem}lar"), i % 2)
                for i, stem in enumerate(["ev", "kitap", "göz", "yol", "kedi", "deniz", "ağaç", "kuş",
                                          "okul", "dağ", "şehir", "masa", "gün", "yıl", "köy", "su",
                                          "taş", "el", "baş", "iş", "kız", "bahçe", "kapı", "köprü"])]


@pytest.fixture(scope="module")
def sharp_model(model):
    """The tiny model with its linears scaled 5x: predictions that depend on the context, so
    Monte-Carlo estimates vary from draw to draw."""
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in sharp.named_parameters():
            if any(key in name for key in ("Wqkv", "Wo", "Wi", "head.dense")):
                param.mul_(5.0)
    return sharp


def test_reported_mc_error_covers_the_spread_over_seeds(sharp_model, tok):
    """20 seeds of 2 Monte-Carlo samples each: a seed's acc lies within 2 of its own reported
    mc_se of the across-seed mean for at least 16 of them (95% nominal), and the reported mc_se
    is of the size of the spread (conservative, docs/evaluation.md, but not past 4x it)."""
    model, runs = sharp_model, []
    for seed in range(20):
        scored = evaluation.score_items(model, tok, SUFFIX_ITEMS, mc_samples=2, seed=seed,
                                        scoring="mc", progress=False)
        metrics = evaluation.mc_metrics(SUFFIX_ITEMS, scored.scores, ("acc", "acc_norm"))
        errors = evaluation.metric_errors(SUFFIX_ITEMS, scored, ("acc", "acc_norm"), draws=300, seed=seed)
        runs.append((metrics, errors))
    for metric in ("acc", "acc_norm"):
        values = torch.tensor([m[metric] for m, _ in runs], dtype=torch.float64)
        reported = torch.tensor([e[metric]["mc_se"] for _, e in runs], dtype=torch.float64)
        spread = float(values.std())
        assert spread > 0.01, metric  # the seeds do disagree: the test can fail
        covered = int(((values - values.mean()).abs() <= 2 * reported).sum())
        assert covered >= 16, (metric, covered, values.tolist(), reported.tolist())
        assert float(reported.mean()) < 4 * spread, (metric, float(reported.mean()), spread)
        assert all(e[metric]["se"] >= e[metric]["mc_se"] for _, e in runs)  # items add error


def test_exact_scoring_has_no_mc_error_and_the_items_error_is_the_binomial_one(model, tok):
    """All answers exact: mc_se = 0, and se is the bootstrap's sqrt(acc (1 - acc) / n)."""
    scored = evaluation.score_items(model, tok, SUFFIX_ITEMS, scoring="exact", progress=False)
    assert scored.counts() == {"exact": 2 * len(SUFFIX_ITEMS), "mc": 0}
    again = evaluation.score_items(model, tok, SUFFIX_ITEMS, scoring="exact", seed=5, progress=False)
    assert again.scores == scored.scores
    acc = evaluation.mc_metrics(SUFFIX_ITEMS, scored.scores, ("acc",))["acc"]
    errors = evaluation.metric_errors(SUFFIX_ITEMS, scored, ("acc",), draws=4000)
    assert errors["acc"]["mc_se"] == 0.0
    binomial = math.sqrt(acc * (1 - acc) / len(SUFFIX_ITEMS))
    assert errors["acc"]["se"] == pytest.approx(binomial, rel=0.08)


def test_resampled_metrics_are_mc_metrics_of_each_draw():
    """_metric_draws on [b, n, C] arrays = mc_metrics row by row (f1, macro_f1 included)."""
    generator = torch.Generator().manual_seed(0)
    examples = [Example("p", ("a", "bb", "ccc"), int(g)) for g in torch.randint(3, (9,), generator=generator)]
    scores = torch.randn(5, 9, 3, generator=generator, dtype=torch.float64).numpy()
    chars = torch.tensor([1.0, 2.0, 3.0]).expand(5, 9, 3).numpy()
    gold = torch.tensor([ex.label for ex in examples]).expand(5, 9).numpy()
    got = evaluation._metric_draws(scores, chars, gold, ("acc", "acc_norm", "f1", "macro_f1"))
    for b in range(5):
        want = evaluation.mc_metrics(examples, scores[b].tolist(), ("acc", "acc_norm", "f1", "macro_f1"))
        for key, value in want.items():
            assert got[key][b] == pytest.approx(value), key


def test_one_sample_gives_no_error_bar(model, tok):
    """A Monte-Carlo answer from a single sample has an unknown error: nan per answer, None per
    metric (no `±` in the table), never a made-up 0."""
    scored = evaluation.score_items(model, tok, SUFFIX_ITEMS[:3], mc_samples=1, scoring="mc", progress=False)
    assert all(math.isnan(e) for item in scored.errors for e in item)
    errors = evaluation.metric_errors(SUFFIX_ITEMS[:3], scored, ("acc", "acc_norm"))
    assert errors == {"acc": {"mc_se": None, "se": None}, "acc_norm": {"mc_se": None, "se": None}}
    result = {"kind": "mc", "title": "t", "metrics": {"acc": 0.5}, "errors": errors}
    assert "| t | 50.00 |" in evaluate_script().markdown_tables([("run", {"t": result})])
