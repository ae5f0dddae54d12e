"""minidiff as a model of EleutherAI's lm-evaluation-harness (lm-eval 0.4.13), and its launcher.

References: lm-evaluation-harness (`LM`, the model registry); CETVEL's task files (Diffutron, arXiv
2603.20466); LLaDA (2502.09992) and dllm (the same estimator). Reader's page: docs/evaluation.md.

    python -m minidiff.evaluation.harness --model_args pretrained=runs/sft2,scoring=auto \\
        --tasks cetvel_diffutron --batch_size 32 --output_path results/   # any lm-eval flag works
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minidiff.data.tokenizer import load_tokenizer
from minidiff.diffusion import DEFAULT_MC_SAMPLES
from minidiff.errors import UserError, run_cli
from minidiff.evaluation.answers import SCORINGS, item_seed, score_answers
from minidiff.evaluation.scoring import DEFAULT_SCORING, MAX_BATCH_SIZE, fit_prompt, prompt_ids
from minidiff.evaluation.tasks import LM_EVAL_TASK_DIR
from minidiff.plumbing import checkpoint
from minidiff.plumbing.device import check_available, enable_tf32, inference_precision
from minidiff.plumbing.files import write_text
from minidiff.speed.sampling import FastConfig, generate

INSTALL_HINT = 'lm-evaluation-harness is not installed; install it with: pip install "minidiff[harness]"'

try:  # lm-eval is an optional extra; without it this module imports, the class refuses to build
    import lm_eval.models  # noqa: F401  lm-eval's own models first: registering ours keeps them
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
    HAVE_LM_EVAL = True
except ImportError:
    LM, HAVE_LM_EVAL = object, False

log = logging.getLogger(__name__)
CETVEL_TASKS = ("belebele_tr", "exams_tr", "ironytr", "news_cat", "mnli_tr", "sts_tr", "xcopa_tr")
LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
MODEL_ARGS = ("pretrained", "scoring", "mc_samples", "batch_size", "device", "dtype", "seed", "max_length", "preset")


def _positive_int(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise UserError(f"model argument {name}={value!r}: expected a positive integer")
    return number


def parse_model_args(pretrained=None, scoring=DEFAULT_SCORING, mc_samples=DEFAULT_MC_SAMPLES, batch_size=32,
                     max_batch_size=None, device=None, dtype="auto", seed=0, max_length=None,
                     preset=None, **sampler_args) -> dict:
    """The checked --model_args (with lm-eval's batch_size/max_batch_size/device); sampler fields are FastConfig's."""
    fields = {f.name for f in dataclasses.fields(FastConfig)}
    unknown = sorted(set(sampler_args) - fields)
    if unknown:
        raise UserError(f"unknown model argument {unknown[0]!r}; expected one of "
                        f"{', '.join([*MODEL_ARGS, *sorted(fields - {'seed'})])}")
    if not pretrained:
        raise UserError("--model_args needs pretrained=DIR_OR_HUB_ID (a minidiff/mmBERT model)")
    if scoring not in SCORINGS:
        raise UserError(f"model argument scoring={scoring!r}: expected one of {', '.join(SCORINGS)}")
    if preset is not None:
        sampler = FastConfig.preset(str(preset), **sampler_args)
    else:
        try:
            sampler = FastConfig(**sampler_args)
        except TypeError as err:
            raise UserError(f"sampler model arguments {sampler_args}: {err}") from None
    # without --device lm-eval says "cuda:0": use the CPU when there is no GPU
    wanted = str(device) if device else "cuda"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        if device and wanted != "cuda:0":  # lm-eval's own default is "cuda:0"
            log.warning("device %s asked for, but there is no GPU: running on the CPU", wanted)
        wanted = "cpu"
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise UserError(f"model argument seed={seed!r}: expected an integer") from None
    # lm-eval passes --batch_size as a string; "auto"/"auto:N" (no memory probing here) means 32
    auto = isinstance(batch_size, str) and batch_size.startswith("auto")
    batch_size = 32 if auto else _positive_int("batch_size", batch_size)
    if batch_size > MAX_BATCH_SIZE:
        raise UserError(f"model argument batch_size={batch_size}: expected at most {MAX_BATCH_SIZE} "
                        "sequences per forward (Monte-Carlo samples beyond it run in further forwards)")
    mc_samples = _positive_int("mc_samples", mc_samples)
    try:
        resolved = torch.device(wanted)
    except (RuntimeError, ValueError):
        raise UserError(f"model argument device={wanted!r} is not a device name; expected cpu or cuda[:N]") from None
    try:  # evaluate.py's --device and --dtype checks (dtype auto | float32 | bfloat16)
        check_available(resolved)
        precision = inference_precision(str(dtype), resolved, pack=True)
    except UserError as err:
        words = str(err).replace("--dtype ", "dtype=", 1).replace("--device ", "device=")
        raise UserError(f"model argument {words}") from None
    return {"pretrained": str(pretrained), "scoring": scoring, "mc_samples": mc_samples, "batch_size": batch_size,
            "device": resolved, "precision": precision, "seed": seed,
            "max_length": None if max_length is None else max(2, _positive_int("max_length", max_length)),
            "sampler": sampler.replace(seed=seed)}  # one seed: the MC draws and the sampler's


class MinidiffLM(LM):
    """An lm-eval model backed by a minidiff checkpoint (a directory or a hub id)."""

    def __init__(self, **model_args):
        if not HAVE_LM_EVAL:
            raise UserError(INSTALL_HINT)
        super().__init__()
        settings = parse_model_args(**model_args)
        self.pretrained, self.batch_size = settings["pretrained"], settings["batch_size"]
        self.scoring, self.mc_samples = settings["scoring"], settings["mc_samples"]
        self.seed, self.sampler = settings["seed"], settings["sampler"]
        self._device = settings["device"]  # LM.device is a read-only property since 0.4.12
        self.precision = settings["precision"]  # evaluate.py's: weights cast (packed on the CPU), autocast per call
        enable_tf32(self._device)
        self.model = self.precision.prepare(checkpoint.load_model(self.pretrained).eval())
        self.tok = load_tokenizer(self.pretrained)
        limit = self.model.config.max_position_embeddings
        self.max_length = min(settings["max_length"] or limit, limit)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's flags (--batch_size, default 1; --device) under --model_args, which win."""
        flags = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**flags, **arg_dict})

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [continuation_pair(self.tok, *request.args, self.max_length) for request in requests]
        # one stream per context, shared by its continuations: evaluate.py's item_seed(seed, prompt)
        seeds = [item_seed(self.seed, request.args[0]) for request in requests]
        return [(value, False) for value in self._score(pairs, seeds, disable_tqdm, "loglikelihood")]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = rolling_pairs(self.tok, [request.args[0] for request in requests], self.max_length)
        first = {}  # each text's first window (owner lists a text's windows together)
        for w, r in enumerate(owner):
            first.setdefault(r, w)
        # one stream per window: (text, window number in it)
        seeds = [item_seed(self.seed, requests[r].args[0], w - first[r]) for w, r in enumerate(owner)]
        totals = [0.0] * len(requests)
        for r, value in zip(owner, self._score(pairs, seeds, disable_tqdm, "loglikelihood_rolling")):
            totals[r] += value  # -NELBO of the text = sum over windows
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # requests with the same settings share batches
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for index in groups.values():
            config, until = generation_settings(self.sampler, dict(requests[index[0]].args[1]))
            for start in range(0, len(index), self.batch_size):
                chunk = index[start:start + self.batch_size]
                room = max(1, self.max_length - config.max_new_tokens)
                prompts = [fit_prompt(prompt_ids(self.tok, requests[i].args[0]), room) for i in chunk]
                with self.precision.autocast():
                    result = generate(self.model, prompts, config, mask_id=self.tok.mask_id,
                                      eos_id=self.tok.eos_id, tokenizer=self.tok, pad_id=self.tok.pad_id)
                for i, answer in zip(chunk, result.answers()):
                    out[i] = cut_answer(self.tok, answer, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out

    def _score(self, pairs: list[tuple], seeds: list[int], disable_tqdm: bool, desc: str) -> list[float]:
        """log p(answer | prompt) per pair (0 for an empty answer), pair i drawing from seeds[i]."""
        values = [0.0] * len(pairs)
        index = [i for i, (_, answer) in enumerate(pairs) if answer]
        for start in tqdm(range(0, len(index), 64), desc=desc, disable=disable_tqdm):
            chunk = index[start:start + 64]
            with self.precision.autocast():
                got = score_answers(self.model, [pairs[i] for i in chunk], self.tok.mask_id, pad_id=self.tok.pad_id,
                                    num_samples=self.mc_samples, batch_size=self.batch_size, scoring=self.scoring,
                                    seeds=[seeds[i] for i in chunk])
            for i, answer in zip(chunk, got):
                values[i] = answer.loglik
        return values


# under `python -m` this file runs as __main__: a second import must not register again
if HAVE_LM_EVAL and "minidiff" not in model_registry:
    model_registry.register("minidiff")(MinidiffLM)


# ----------------------------------------------------------------------------- requests as token ids
def continuation_pair(tok, context: str, continuation: str, max_length: int) -> tuple[list[int], list[int]]:
    """A loglikelihood request as (prompt ids, answer ids), the prompt cut from the left to fit."""
    answer = tok.encode(continuation, add_special_tokens=False)
    if len(answer) >= max_length:
        raise UserError(f"a continuation of {len(answer)} tokens does not fit the model's "
                        f"context of {max_length} tokens after <bos>")
    return fit_prompt(prompt_ids(tok, context), max_length - len(answer)), answer


def rolling_pairs(tok, texts: list[str], max_length: int) -> tuple[list, list[int]]:
    """lm-eval's rolling windows of every text as (context ids, new ids) pairs, and each pair's text."""
    pairs, owner = [], []
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    for r, text in enumerate(texts):
        tokens = tok.encode(text, add_special_tokens=False)
        for window in get_rolling_token_windows(tokens, prefix, max_length - 1, 1):
            context, new = make_disjoint_window(window)
            pairs.append((list(context), list(new)))
            owner.append(r)
    return pairs, owner


# ----------------------------------------------------------------------------- generation
def generation_settings(sampler: FastConfig, kwargs: dict) -> tuple[FastConfig, list[str]]:
    """(the sampler settings with the task's max_gen_toks and temperature laid over, the `until` strings)."""
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    changes = {}
    if "max_gen_toks" in kwargs:
        changes["max_new_tokens"] = _positive_int("max_gen_toks", kwargs.pop("max_gen_toks"))
    if kwargs.pop("do_sample", None) is False:
        changes["temperature"] = 0.0
    if "temperature" in kwargs:
        changes["temperature"] = float(kwargs.pop("temperature"))
    if kwargs:
        log.warning("minidiff ignores these generation settings: %s", sorted(kwargs))
    return sampler.replace(**changes), until


def cut_answer(tok, answer: list[int], until: list[str]) -> str:
    """The answer up to its first eos/pad, decoded, then cut before the first `until` string."""
    ends = [answer.index(t) for t in (tok.eos_id, tok.pad_id) if t in answer]
    text = tok.decode(answer[:min(ends)] if ends else answer, skip_special_tokens=True)
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


# ----------------------------------------------------------------------------- task folders
def task_path(data: dict[str, str] | None = None, directory=None) -> str:
    """lm-eval's include path: the shipped CETVEL folder, or a full copy reading `data`'s files as test splits."""
    if not data:
        return str(LM_EVAL_TASK_DIR)
    directory = Path(directory or tempfile.mkdtemp(prefix="minidiff-cetvel-"))
    directory.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(data) - set(CETVEL_TASKS))
    if unknown:
        raise UserError(f"--cetvel_data {unknown[0]}=...: {unknown[0]!r} is not a CETVEL task; "
                        f"expected one of {', '.join(CETVEL_TASKS)}")
    for name in CETVEL_TASKS:
        local = _local_dataset(name, data[name]) if name in data else ""
        write_text(directory / f"cetvel_{name}.yaml", f"include: {LM_EVAL_TASK_DIR / f'cetvel_{name}.yaml'}\n{local}")
    group = (LM_EVAL_TASK_DIR / "cetvel_diffutron.yaml").read_text(encoding="utf-8")
    write_text(directory / "cetvel_diffutron.yaml", group)
    return str(directory)


def _local_dataset(name: str, file: str) -> str:
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"--cetvel_data {name}={file}: the file does not exist")
    builder = LOCAL_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"--cetvel_data {name}={file}: expected a .csv, .json, .jsonl or .parquet file")
    # zero-shot: no training/validation/few-shot split may be named, or lm-eval looks for it
    return (f"dataset_path: {builder}\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {str(path)!r}\n"
            "test_split: test\nvalidation_split: null\ntraining_split: null\nfewshot_split: null\n")


# ----------------------------------------------------------------------------- launcher
def _take_cetvel_data(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Remove `--cetvel_data NAME=FILE [NAME=FILE ...]` (ours, not lm-eval's) from argv."""
    rest, data, taking = [], {}, False
    for arg in argv:
        if arg == "--cetvel_data":
            taking = True
        elif taking and not arg.startswith("-"):
            name, sep, file = arg.partition("=")
            if not sep or not file:
                raise UserError(f"--cetvel_data {arg}: expected NAME=FILE, e.g. ironytr=val.csv")
            data[name.strip()] = file
        else:
            taking = False
            rest.append(arg)
    return rest, data


def _model_args_in(argv: list[str]) -> dict:
    """The --model_args/-a values of argv ("k=v,k2=v2" or several "k=v" words), parsed as lm-eval does."""
    words, taking = [], False
    for arg in argv:
        if arg in ("--model_args", "-a"):
            taking = True
        elif arg.startswith("--model_args="):
            words.append(arg.partition("=")[2])
        elif taking and not arg.startswith("-"):
            words.append(arg)
        else:
            taking = False
    return simple_parse_args_string(",".join(words))


def check_model_args(args: dict) -> None:
    """Fail before lm-eval indexes its tasks: the arguments, and a local pretrained= being a model directory."""
    name = parse_model_args(**args)["pretrained"]
    if Path(name).expanduser().exists() or checkpoint._looks_like_path(name):
        directory = checkpoint.resolve_model_dir(name)
        checkpoint.read_config(directory)
        if not any((directory / f).exists() for f in (checkpoint.WEIGHTS_FILE, checkpoint.WEIGHTS_INDEX_FILE)):
            raise UserError(f"pretrained={name}: {directory} has no {checkpoint.WEIGHTS_FILE}; "
                            "expected a model directory")


def main(argv: list[str] | None = None) -> int:
    """`lm_eval --model minidiff ...` with the CETVEL tasks as the include path (unless one is given)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not HAVE_LM_EVAL:
        raise UserError(INSTALL_HINT)
    argv, data = _take_cetvel_data(argv)
    asks_help = "-h" in argv or "--help" in argv
    if asks_help:
        print("python -m minidiff.evaluation.harness: lm-eval with --model minidiff and the CETVEL tasks "
              f"({', '.join(f'cetvel_{n}' for n in CETVEL_TASKS)}, group cetvel_diffutron) on the "
              "include path; one flag of its own: --cetvel_data NAME=FILE [NAME=FILE ...] (local "
              "files for those tasks). lm-eval's flags:\n")
    subcommand = argv[0] if argv and argv[0] in ("run", "ls", "validate") else None
    if subcommand in (None, "run"):
        if "--model" not in argv and "-M" not in argv:
            argv = argv[:1] + ["--model", "minidiff"] + argv[1:] if subcommand else ["--model", "minidiff", *argv]
        if "--model" in argv and argv[argv.index("--model") + 1] == "minidiff" and not asks_help:
            check_model_args(_model_args_in(argv))
    if "--include_path" in argv:
        if data:
            raise UserError("--cetvel_data and --include_path cannot be combined; lm-eval takes "
                            "one include path (give your own folder, or the CETVEL data)")
    else:
        argv += ["--include_path", task_path(data)]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except ValueError as err:  # lm-eval's word for a task name it has not found
        if str(err).startswith("Tasks not found"):
            raise UserError(f"{err}; the CETVEL tasks are cetvel_NAME (or the group "
                            "cetvel_diffutron), see `python -m minidiff.evaluation.harness ls tasks`") from None
        raise
    return 0


if __name__ == "__main__":
    run_cli(main)
