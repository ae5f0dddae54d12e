"""minidiff.evaluation.harness driven by lm-eval itself (offline, local task files, a tiny model).

The references: diffusion.mc_loglik called here on token ids from the tokenizers library, the
rolling windows written out by hand from lm-eval's documented rule, sampler.generate called
directly, evaluate.py's own results, and hand-computed metric values."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval  # noqa: E402  the harness extra (setup.sh installs it): these tests run lm-eval itself
import pytest
import torch
from helpers import BOS, EOS, MASK, PAD, make_model_dir
from test_evaluate_cli import run_in_process as run_evaluate
from tokenizers import Tokenizer

import minidiff  # noqa: E402
from minidiff import diffusion  # noqa: E402
from minidiff.errors import UserError, run_cli  # noqa: E402
from minidiff.evaluation import harness
from minidiff.evaluation import scoring as evaluation
from minidiff.evaluation.answers import item_seed
from minidiff.evaluation.tasks import LM_EVAL_TASK_DIR, TASKS  # noqa: E402
from minidiff.sampler import SamplerConfig  # noqa: E402
from minidiff.speed.sampling import FastConfig, generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MC_SAMPLES, SEED, ROLLING_MAX = 3, 5, 8

MC_ROWS = [  # multi-token choices, so the Monte-Carlo path is used, not only the exact one
    {"prompt": "Türkiye'nin başkenti", "choices": ["Ankara şehri", "İzmir"], "label": 0},
    {"prompt": "Güneş doğudan", "choices": ["batar", "doğar ve yükselir", "uçar"], "label": 1},
    {"prompt": "Kedi", "choices": ["miyavlar", "havlar"], "label": 0},
    {"prompt": "", "choices": ["Ekonomi", "Spor"], "label": 1},  # an empty context
]
TEXTS = ["Türkiye Cumhuriyeti 1923 yılında kuruldu ve başkenti Ankara oldu.",
         "Kediler uyur."]
GEN_CONTEXT = "Soru: Türkiye'nin başkenti neresidir? Cevap:"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def local_yaml(name, data, body):
    """An offline task: the json builder on a local file, zero-shot (no other split named)."""
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {str(data)!r}\n"
            "test_split: test\ntraining_split: null\nvalidation_split: null\n" + body)


MC_BODY = """output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
ROLLING_BODY = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), seed=1)


@pytest.fixture(scope="module")
def raw_tok(model_dir):
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def model(model_dir):
    return minidiff.load_model(model_dir).eval()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tasks")
    mc = write_jsonl(directory / "mc.jsonl", MC_ROWS)
    (directory / "mini_mc.yaml").write_text(local_yaml("mini_mc", mc, MC_BODY), encoding="utf-8")
    texts = write_jsonl(directory / "texts.jsonl", [{"text": t} for t in TEXTS])
    (directory / "mini_rolling.yaml").write_text(local_yaml("mini_rolling", texts, ROLLING_BODY),
                                                 encoding="utf-8")
    return directory


def evaluate(model_dir, task_dirs, tasks, **model_args):
    """lm-eval's simple_evaluate on local tasks only (lm-eval's own index takes ~20 s to build)."""
    from lm_eval.tasks import TaskManager

    args = {"pretrained": str(model_dir), "scoring": "mc", "mc_samples": MC_SAMPLES, "seed": SEED,
            "dtype": "float32", **model_args}  # fp32: the references below are fp32
    manager = TaskManager(include_path=[str(d) for d in task_dirs], include_defaults=False)
    return lm_eval.simple_evaluate(model="minidiff", model_args=args, tasks=tasks, task_manager=manager,
                                   log_samples=True, bootstrap_iters=0, device="cpu")


def minidiff_loglik(model, raw_tok, prompt: str, answer: str) -> float:
    """minidiff's own scorer on ids from the tokenizers library: <bos> + prompt | answer, drawn
    from the prompt's stream (evaluate.py's)."""
    prompt_ids = [BOS] + raw_tok.encode(prompt, add_special_tokens=False).ids
    answer_ids = raw_tok.encode(answer, add_special_tokens=False).ids
    samples = 1 if len(answer_ids) == 1 else MC_SAMPLES
    return diffusion.mc_loglik(model, prompt_ids, answer_ids, MASK, num_samples=samples,
                               generator=torch.Generator().manual_seed(item_seed(SEED, prompt)))


@pytest.fixture(scope="module")
def mc_and_rolling(model_dir, task_dir):
    mc = evaluate(model_dir, [task_dir], ["mini_mc"])
    rolling = evaluate(model_dir, [task_dir], ["mini_rolling"], max_length=ROLLING_MAX)  # several windows
    return {key: {**mc[key], **rolling[key]} for key in ("results", "samples")}


# ----------------------------------------------------------------------------- loglikelihood


def test_every_loglikelihood_is_minidiffs_scorer(mc_and_rolling, model, raw_tok):
    samples = mc_and_rolling["samples"]["mini_mc"]
    assert len(samples) == len(MC_ROWS)
    multi_token = 0
    for sample in samples:
        row = MC_ROWS[sample["doc_id"]]
        assert len(sample["arguments"]) == len(row["choices"])
        for (context, continuation), resp, choice in zip(
                [a for a in sample["arguments"]], sample["resps"], row["choices"]):
            assert (context, continuation) == (row["prompt"], " " + choice)  # lm-eval's delimiter
            value, is_greedy = resp[0]
            assert is_greedy is False  # documented: never claimed
            assert value == pytest.approx(minidiff_loglik(model, raw_tok, row["prompt"], " " + choice),
                                          abs=1e-4)
            multi_token += len(raw_tok.encode(" " + choice, add_special_tokens=False).ids) > 1
    assert multi_token >= 3


def test_accuracy_equals_evaluate_py_on_the_same_rows(mc_and_rolling, model_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, err = run_evaluate(["--model", model_dir, "--task", f"mc:{task_dir / 'mc.jsonl'}", "--scoring", "mc",
                              "--mc-samples", MC_SAMPLES, "--seed", SEED, "--no-progress", "--out", out], capsys)
    assert code == 0, err
    ours = json.loads(out.read_text())["tasks"][f"mc:{task_dir / 'mc.jsonl'}"]["metrics"]
    theirs = mc_and_rolling["results"]["mini_mc"]
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    # and both from the log-likelihoods, by hand: argmax of the sum, and of the sum / characters
    hand, hand_norm = 0, 0
    for sample in mc_and_rolling["samples"]["mini_mc"]:
        row = MC_ROWS[sample["doc_id"]]
        lls = [r[0][0] for r in sample["resps"]]
        hand += max(range(len(lls)), key=lambda i: lls[i]) == row["label"]
        norm = [v / len(c) for v, c in zip(lls, row["choices"])]
        hand_norm += max(range(len(norm)), key=lambda i: norm[i]) == row["label"]
    assert ours["acc"] == hand / len(MC_ROWS) and ours["acc_norm"] == hand_norm / len(MC_ROWS)


def test_model_arguments_win_over_lm_evals_flags(model_dir):
    lm = harness.MinidiffLM.create_from_arg_string(
        f"pretrained={model_dir},batch_size=2,mc_samples=4,steps=16,preset=diffutron-short",
        {"batch_size": "1", "max_batch_size": None, "device": "cuda:0"})
    assert (lm.batch_size, lm.mc_samples) == (2, 4)
    assert lm.sampler == FastConfig.preset("diffutron-short", steps=16, seed=0)
    assert lm.device == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    lm = harness.MinidiffLM.create_from_arg_string(f"pretrained={model_dir}", {"batch_size": "auto:4"})
    assert lm.batch_size == 32


def test_a_long_context_loses_its_left_part_after_bos():
    fit = evaluation.fit_prompt  # the harness's and evaluate.py's cut
    assert fit([BOS, 10, 11, 12, 13], 3) == [BOS, 12, 13]
    assert fit([BOS, 10, 11], 3) == [BOS, 10, 11]


# ----------------------------------------------------------------------------- rolling


def hand_windows(tokens, max_length):
    """lm-eval's rolling windows (context length 1), written out: window 1 scores the first
    S = max_length - 1 tokens after <bos>; each later one the next S tokens given the token
    before them; the last one fewer tokens given as many earlier tokens as fit (S + 1 in all)."""
    S = max_length - 1
    windows = [([BOS], tokens[:S])]
    for start in range(S, len(tokens), S):
        end = min(start + S, len(tokens))
        windows.append((tokens[end - S - 1:start], tokens[start:end]))
    return windows


def test_rolling_is_the_windowed_nelbo_bound(mc_and_rolling, model, raw_tok):
    samples = mc_and_rolling["samples"]["mini_rolling"]
    checked_multi_window = False
    for sample in samples:
        text = TEXTS[sample["doc_id"]]
        tokens = raw_tok.encode(text, add_special_tokens=False).ids
        windows = hand_windows(tokens, ROLLING_MAX)
        assert sum(len(new) for _, new in windows) == len(tokens)  # each token scored once
        assert all(len(c) + len(n) <= ROLLING_MAX for c, n in windows)
        expected = 0.0
        for number, (context, new) in enumerate(windows):  # each window its own stream
            samples_n = 1 if len(new) == 1 else MC_SAMPLES
            stream = torch.Generator().manual_seed(item_seed(SEED, text, number))
            expected += diffusion.mc_loglik(model, context, new, MASK, num_samples=samples_n, generator=stream)
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-4)
        checked_multi_window |= len(windows) >= 3
    assert checked_multi_window
    results = mc_and_rolling["results"]["mini_rolling"]
    assert results["word_perplexity,none"] > 1 and results["bits_per_byte,none"] > 0


# ----------------------------------------------------------------------------- generation


def test_generate_until_is_the_sampler_cut_at_until(model_dir, model, raw_tok, tmp_path):
    # the reference: the sampler called directly, the answer up to eos/pad, decoded
    prompt = [BOS] + raw_tok.encode(GEN_CONTEXT, add_special_tokens=False).ids
    config = SamplerConfig(max_new_tokens=8, steps=8, block_length=8, seed=SEED)
    answer = generate(model, [prompt], config, mask_id=MASK, eos_id=EOS, pad_id=PAD).answers()[0]
    assert len(answer) == 8  # max_gen_toks new tokens at most
    ends = [answer.index(t) for t in (EOS, PAD) if t in answer]
    full = raw_tok.decode(answer[:min(ends)] if ends else answer, skip_special_tokens=True)
    assert len(full) >= 4, full  # this seed's model writes some text to cut
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = full[:full.index(stop)]
    assert cut != full

    data = write_jsonl(tmp_path / "gen.jsonl", [{"context": GEN_CONTEXT, "target": "Ankara"}] * 2)
    for name, until in (("gen_cut", stop), ("gen_full", "§never§")):
        body = ("output_type: generate_until\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
                f"generation_kwargs:\n  until: [{json.dumps(until, ensure_ascii=False)}]\n"
                "  max_gen_toks: 8\n  do_sample: false\n"
                "metric_list:\n  - metric: exact_match\n")
        (tmp_path / f"{name}.yaml").write_text(local_yaml(name, data, body), encoding="utf-8")
    result = evaluate(model_dir, [tmp_path], ["gen_cut", "gen_full"], steps=8, block_length=8,
                      batch_size=2)
    assert [s["resps"][0][0] for s in result["samples"]["gen_cut"]] == [cut, cut]
    assert [s["resps"][0][0] for s in result["samples"]["gen_full"]] == [full, full]


# ----------------------------------------------------------------------------- the command line


@pytest.mark.slow  # lm-eval's command line indexes its ~15k task files first (20-30 s here)
def test_command_line_is_lm_eval_with_model_minidiff(model_dir, cetvel_run, tmp_path):
    """The launcher on the CETVEL tasks with --cetvel_data: the in-process numbers. IronyTR is
    left out: lm-eval's command line bootstraps the stderr of its f1 100,000 times (minutes)."""
    result, data = cetvel_run
    names = [n for n in harness.CETVEL_TASKS if n != "ironytr"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "minidiff.evaluation.harness", "--model_args",
         f"pretrained={model_dir},mc_samples={MC_SAMPLES},seed={SEED},dtype=float32",
         "--tasks", *[f"cetvel_{n}" for n in names], "--cetvel_data", *[f"{n}={data[n]}" for n in names],
         "--device", "cpu", "--batch_size", "auto", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert sorted(results) == sorted(f"cetvel_{n}" for n in names)
    for name in names:
        for metric in ("acc,none", "acc_norm,none"):
            assert results[f"cetvel_{name}"][metric] == result["results"][f"cetvel_{name}"][metric]
    assert "|cetvel_news_cat|" in proc.stdout.replace(" ", "")


# ----------------------------------------------------------------------------- CETVEL


FIXTURES = {  # three rows each, in the hub dataset's own columns
    "belebele_tr": [{"flores_passage": f"Metin {i}.", "question": f" Soru {i}? ", "mc_answer1": "bir",
                     "mc_answer2": "iki", "mc_answer3": "üç", "mc_answer4": "dört",
                     "correct_answer_num": str(i + 1)} for i in range(3)],
    "exams_tr": [{"question": {"stem": f"Soru {i}", "choices": {"text": ["a", "b c", "d", "e"],
                                                                "label": ["A", "B", "C", "D"]}},
                  "answerKey": key} for i, key in enumerate(["B", " A", "Z"])],  # Z: CETVEL's index 3
    "ironytr": [{"text": t, "label": lab} for t, lab in
                [("Harika, yine yağmur!", 1), ("Bugün okula gittim.", 0), ("Ne güzel trafik.", 1)]],
    "news_cat": [{"text": "Takım maçı kazandı.", "label": "sport"},
                 {"text": "Faiz kararı açıklandı.", "label": "economy"},
                 {"text": "Yeni aşı dönemi.", "label": 3}],
    "mnli_tr": [{"premise": "Çocuklar oynuyor.", "hypothesis": h, "label": lab}
                for h, lab in [("Dışarıdalar.", 0), ("Uyuyorlar.", 2), ("Parktalar.", 1)]],
    "sts_tr": [{"sentence1": "Kedi uyuyor.", "sentence2": s, "score": sc}
               for s, sc in [("Uçak kalkıyor.", 0.2), ("Kedi dinleniyor.", 3.6), ("Kedi uyuyor.", 5.0)]],
    "xcopa_tr": [{"premise": p, "choice1": "Buz üzerinde kaydı.", "choice2": "Şarkı söyledi.",
                  "question": q, "label": lab}
                 for p, q, lab in [("Adam düştü.", "cause", 0), ("Hava soğuktu.", "effect", 1),
                                   ("Kapı açıldı", "cause", 0)]],
}


def test_shipped_cetvel_files_load_in_lm_evals_task_manager():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=harness.task_path(), include_defaults=False)
    names = {f"cetvel_{n}" for n in harness.CETVEL_TASKS}
    assert names <= set(manager.all_tasks) and "cetvel_diffutron" in manager.all_groups
    # every shipped task reads the hub source that evaluate.py reads (repository and split)
    import yaml

    for name in harness.CETVEL_TASKS:
        text = (LM_EVAL_TASK_DIR / f"cetvel_{name}.yaml").read_text(encoding="utf-8")
        config = yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)
        repo = TASKS[name].hub_uri.removeprefix("hf://datasets/").split("/")
        assert config["dataset_path"] == "/".join(repo[:2])
        assert config["test_split"] in TASKS[name].hub.rsplit(",", 1)[1]
        assert "group" not in config and "training_split" not in config


# CETVEL's task files at KUIS-AI/cetvel 8942619: the split lm-eval draws few-shot rows from
# (training_split if named, else validation_split; Belebele names fewshot_split test, first_n)
CETVEL_FEWSHOT = {"belebele_tr": ("test", "first_n"), "exams_tr": ("train", None),
                  "news_cat": ("train", None), "sts_tr": ("train", None), "mnli_tr": ("train", None),
                  "xcopa_tr": ("validation", None), "ironytr": ("validation", None)}


def test_fewshot_rows_come_from_cetvels_splits():
    import yaml

    for name in harness.CETVEL_TASKS:
        text = (LM_EVAL_TASK_DIR / f"cetvel_{name}.yaml").read_text(encoding="utf-8")
        config = yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)
        sampler = (config.get("fewshot_config") or {}).get("sampler")
        assert (config["fewshot_split"], sampler) == CETVEL_FEWSHOT[name], name


@pytest.fixture(scope="module")
def cetvel_run(model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cetvel")
    data = {name: str(write_jsonl(directory / f"{name}.jsonl", rows)) for name, rows in FIXTURES.items()}
    path = harness.task_path(data, directory / "tasks")
    return evaluate(model_dir, [path], ["cetvel_diffutron"]), data


def test_cetvel_tasks_run_on_local_files_as_evaluate_py_renders_them(cetvel_run):
    result, data = cetvel_run
    for name in harness.CETVEL_TASKS:
        samples = sorted(result["samples"][f"cetvel_{name}"], key=lambda s: s["doc_id"])
        assert len(samples) == 3, name
        examples = evaluation.load_examples(evaluation.parse_task(f"{name}:{data[name]}"))
        for sample, example in zip(samples, examples):
            assert [tuple(a) for a in sample["arguments"]] == [
                (example.prompt, " " + c) for c in example.choices], name
            assert int(sample["target"]) == example.label, name
        # lm-eval's aggregate = minidiff's metric on the same log-likelihoods
        scores = [[r[0][0] for r in s["resps"]] for s in samples]
        ours = evaluation.mc_metrics(examples, scores, TASKS[name].metrics)
        theirs = result["results"][f"cetvel_{name}"]
        assert theirs["acc,none"] == pytest.approx(ours["acc"]) and \
            theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"]), name
        if name == "ironytr":
            assert theirs["f1,none"] == pytest.approx(ours["f1"])
        if name == "news_cat":
            assert theirs["f1,none"] == pytest.approx(ours["macro_f1"])
        if name in ("mnli_tr", "sts_tr"):
            assert set(ours) == {"acc", "acc_norm"} and "f1,none" not in theirs
    assert "acc,none" in result["results"]["cetvel_diffutron"]


MNLI_ROWS = [{"premise": "Kedi uyuyor.", "hypothesis": h, "label": label}
             for h, label in [("Bir hayvan uyuyor.", 0), ("Kedi koşuyor.", 2), ("Kedi siyah.", -1),
                              ("Köpek havlıyor.", 1), ("Kedi dinleniyor.", -1)]]


def test_mnli_rows_without_gold_count_wrong_as_in_lm_eval(model_dir, tmp_path, capsys):
    """nli_tr's label -1 (no gold): lm-eval scores the row and counts it wrong; evaluate.py the
    same by default (and says how many), or leaves the rows out with --drop-unlabeled."""
    data = write_jsonl(tmp_path / "mnli.jsonl", MNLI_ROWS)
    path = harness.task_path({"mnli_tr": str(data)}, tmp_path / "tasks")
    result = evaluate(model_dir, [path], ["cetvel_mnli_tr"])
    samples = sorted(result["samples"]["cetvel_mnli_tr"], key=lambda s: s["doc_id"])
    labeled_hits = sum(max(range(3), key=lambda i: s["resps"][i][0][0]) == row["label"]
                       for s, row in zip(samples, MNLI_ROWS) if row["label"] >= 0)
    assert result["results"]["cetvel_mnli_tr"]["acc,none"] == pytest.approx(labeled_hits / 5)
    for flags, n, want in (([], 5, labeled_hits / 5), (["--drop-unlabeled"], 3, labeled_hits / 3)):
        out = tmp_path / f"results{len(flags)}.json"
        code, err = run_evaluate(["--model", model_dir, "--task", f"mnli_tr:{data}", "--scoring", "mc",
                                  "--mc-samples", MC_SAMPLES, "--seed", SEED, "--no-progress",
                                  "--out", out, *flags], capsys)
        assert code == 0, err
        task = json.loads(out.read_text())["tasks"]["mnli_tr"]
        assert (task["n"], task["unlabeled"]) == (n, 2 if n == 5 else 0)
        assert task["metrics"]["acc"] == pytest.approx(want)
        assert "2 of 5 items have no gold label" in err


# ----------------------------------------------------------------------------- CETVEL's metrics


def test_irony_f1_is_binary_f1_of_label_one():
    # gold 1 1 0 0 1, pred 1 0 1 0 1: class 1 tp 2 fp 1 fn 1 -> 4 / 6; (class 0 would be 1/2)
    gold, pred = [1, 1, 0, 0, 1], [1, 0, 1, 0, 1]
    assert evaluation.binary_f1(gold, pred) == pytest.approx(2 / 3)
    examples = [evaluation.Example("p", ("Hayır", "Evet"), g) for g in gold]
    scores = [[-1.0, -0.5] if p == 1 else [-0.5, -1.0] for p in pred]
    metrics = evaluation.mc_metrics(examples, scores, TASKS["ironytr"].metrics)
    assert metrics == {"acc": 0.6, "acc_norm": pytest.approx(0.6), "f1": pytest.approx(2 / 3)}
    assert evaluation.binary_f1([0, 0], [0, 0]) == 0.0  # no positive anywhere: 0, as sklearn


def test_news_macro_f1_and_english_labels(tmp_path):
    rows = [{"text": "a", "label": "sport"}, {"text": "b", "label": "magazine"},
            {"text": "c", "label": "politics"}, {"text": "d", "label": "Health"},
            {"text": "e", "label": "economy"}, {"text": "f", "label": 2}]
    examples = evaluation.load_examples(evaluation.parse_task(f"news_cat:{write_jsonl(tmp_path / 'n.jsonl', rows)}"))
    assert [e.label for e in examples] == [0, 1, 2, 3, 4, 2]
    # gold 0 1 2 3 4 2, pred 0 0 2 3 4 1: F1 per class 0: 2/3, 1: 0, 2: 2/3, 3: 1, 4: 1 -> 10/3 / 5
    assert evaluation.macro_f1([0, 1, 2, 3, 4, 2], [0, 0, 2, 3, 4, 1]) == pytest.approx(2 / 3)
    assert TASKS["news_cat"].metrics == ("acc", "acc_norm", "macro_f1")
    assert TASKS["mnli_tr"].metrics == ("acc", "acc_norm") == TASKS["sts_tr"].metrics
    assert TASKS["mnli_tr"].render({"premise": "a", "hypothesis": "b", "label": 0}).choices == (
        "TUTARLI", "ALAKASIZ", "ÇELİŞKİLİ")


# ----------------------------------------------------------------------------- bad inputs


def run_launcher(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: harness.main([str(a) for a in argv]))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("model_args, words", [
    ("pretrained={empty}", "config.json is missing"),
    ("pretrained={model},bogus=1", "unknown model argument 'bogus'"),
    ("pretrained={model},mc_samples=0", "mc_samples=0: expected a positive integer"),
    ("pretrained={model},batch_size=100000", "expected at most 1024"),
    ("pretrained={model},scoring=best", "expected one of auto, exact, mc"),
    ("mc_samples=4", "needs pretrained="),
    ("pretrained={model},device=mps", "device=mps is not supported"),  # evaluate.py's device check
    ("pretrained={model},device=abacus", "device='abacus' is not a device name"),
])
def test_bad_model_arguments_are_one_sentence(model_args, words, model_dir, tmp_path, capsys):
    args = model_args.format(empty=tmp_path, model=model_dir)
    code, err = run_launcher(["--model_args", args, "--tasks", "mini_mc"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err


def test_not_a_model_through_simple_evaluate_is_a_user_error(tmp_path, task_dir):
    with pytest.raises(UserError, match="config.json is missing"):
        evaluate(tmp_path, [task_dir], ["mini_mc"])


def test_without_lm_eval_the_launcher_says_how_to_install():
    code = ("import sys, runpy; sys.modules['lm_eval'] = None; sys.argv = ['x', '--tasks', 't'];"
            "runpy.run_module('minidiff.evaluation.harness', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2
    assert proc.stderr == 'error: lm-evaluation-harness is not installed; install it with: pip install "minidiff[harness]"\n'


def test_bad_cetvel_data_is_one_sentence(tmp_path, capsys):
    code, err = run_launcher(["--cetvel_data", f"hellaswag={tmp_path}/x.csv", "--tasks", "cetvel_diffutron",
                              "--model_args", "pretrained=x"], capsys)
    assert code == 2 and "not a CETVEL task" in err and err.count("\n") == 1, err
    code, err = run_launcher(["--cetvel_data", f"ironytr={tmp_path}/nope.csv", "--tasks", "cetvel_ironytr",
                              "--model_args", "pretrained=x"], capsys)
    assert code == 2 and "does not exist" in err and err.count("\n") == 1, err


def test_precision_is_evaluate_pys(model_dir):
    """One policy for every entry point: the harness's dtype is evaluate.py's --dtype."""
    from minidiff.plumbing.device import inference_precision

    cpu = torch.device("cpu")
    for dtype in ("auto", "float32", "bfloat16"):
        got = harness.parse_model_args(pretrained=str(model_dir), dtype=dtype, device="cpu")["precision"]
        assert got == inference_precision(dtype, cpu, pack=True), dtype
    with pytest.raises(UserError, match="dtype=float16 is not supported"):
        harness.parse_model_args(pretrained=str(model_dir), dtype="float16", device="cpu")
    lm = harness.MinidiffLM(pretrained=str(model_dir), dtype="bfloat16", device="cpu")
    norms = [m for m in lm.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # as evaluate.py holds them
    assert lm.model.model.embeddings.tok_embeddings.weight.dtype == torch.bfloat16
