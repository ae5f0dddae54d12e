"""Generate, chat or fill in blanks with a minidiff / Diffutron model, watching the denoising.

References: LLaDA (arXiv 2502.09992), Fast-dLLM (2505.22618), Diffutron (2603.20466); the
sampler matches dllm's LLaDA generator and the Diffutron fork. Reader's page: docs/sampler.md.

    python sample.py --model DIR --prompt "Türkiye'nin başkenti neresidir?" --preset diffutron-long
    python sample.py --model DIR --chat
    python sample.py --model DIR --infill "İstanbul <mask> <mask> Asya'yı ayırır." --raw
    python sample.py --model DIR --prompt "..." --json --trace-html denoise.html
    python sample.py --model DIR --prompt "..." --cache dual --threshold 0.9 --compile

Prompts go through dllm's chat template (`[Question]...[/Question]` then `[Answer]`)
unless --raw. Many --prompt flags run in batches of --batch-size, each answer its prompt's alone
(--length-bucket); steps beyond a block's
positions are capped (a note on stderr says so). In a terminal the canvas is redrawn after every step (masks as dim blocks);
when stdout is not a terminal only the answers are printed (or JSON with --json).
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from minidiff.errors import UserError, run_cli
from minidiff.plumbing import flags
from minidiff.plumbing.device import add_precision_flags
from minidiff.plumbing.sampling_cli import (
    add_sampler_flags,
    answer_text,
    load_for_sampling,
    prompt_ids,
    sampler_config,
)
from minidiff.plumbing.trace_page import write_trace_html
from minidiff.sampler import steps_per_block
from minidiff.speed.sampling import FastConfig, generate, infill

MASK_CHAR = "░"
DIM, RESET = "\x1b[2m", "\x1b[0m"


def parse_args(argv=None):
    p = flags.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.json) or hub id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    what.add_argument("--chat", action="store_true", help="interactive chat with the chat template")
    what.add_argument("--infill", help="text with <mask> markers to fill in")
    p.add_argument("--raw", action="store_true", help="use the prompt text as is (no chat template)")
    p.add_argument("--system", help="system message for the chat template")
    add_sampler_flags(p)
    p.add_argument("--batch-size", type=int, default=8, help="prompts denoised together (more --prompt "
                   "flags run in batches of this many: the memory of a step grows with it)")
    p.add_argument("--json", action="store_true", help="print JSON: ids, text, steps used")
    p.add_argument("--trace-html", type=Path, help="write a self-contained HTML page replaying the denoising")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_precision_flags(p)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- text


def render_row(tok, ids: list[int], mask_id: int, color: bool) -> str:
    """Committed runs decoded, each mask a block character (dim in a terminal)."""
    out, run = [], []
    for t in ids + [None]:
        if t is not None and t != mask_id:
            run.append(t)
            continue
        if run:
            out.append(tok.decode(run, skip_special_tokens=True))
            run = []
        if t is not None:
            out.append(f"{DIM}{MASK_CHAR}{RESET}" if color else MASK_CHAR)
    return "".join(out).replace("\n", "↵")


class LiveView:
    """Redraws each row's answer region after every step (ANSI: cursor up + clear)."""

    def __init__(self, tok, mask_id: int, stream=sys.stdout):
        self.tok, self.mask_id, self.stream, self.lines = tok, mask_id, stream, 0

    def __call__(self, out) -> None:
        rows = out.sequences.tolist()
        text = [render_row(self.tok, row[s:e], self.mask_id, True)
                for row, s, e in zip(rows, out.answer_start, out.answer_end)]
        text[-1] += f"  {DIM}[step {out.num_forward}]{RESET}"
        width = max(shutil.get_terminal_size().columns, 20)
        if self.lines:
            self.stream.write(f"\x1b[{self.lines}F\x1b[J")
        visible = [len(t.replace(DIM, "").replace(RESET, "")) for t in text]
        self.lines = sum(max(1, -(-v // width)) for v in visible)
        self.stream.write("\n".join(text) + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.lines:
            self.stream.write(f"\x1b[{self.lines}F\x1b[J")
            self.stream.flush()
        self.lines = 0


# ----------------------------------------------------------------------------- main


def note_capped_steps(config: FastConfig, span: int) -> None:
    """Say on stderr when the steps per block exceed a block's positions (the sampler caps them)."""
    asked, used = steps_per_block(config.steps, span, config.block_length)
    if asked > used:
        print(f"note: --steps {config.steps} gives {asked} steps per block, more than a block's {used} "
              f"positions; each block takes at most {used} steps.", file=sys.stderr)


def check_sizes(args) -> None:
    """The batch size, and --trace-html's one batch."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be an integer >= 1, got {args.batch_size}.")
    if args.trace_html is not None and args.prompt and len(args.prompt) > args.batch_size:
        raise UserError(f"--trace-html replays one batch but {len(args.prompt)} prompts make several; "
                        f"give at most --batch-size ({args.batch_size}) prompts or raise it.")


def run_once(model, tok, ids_list, config, args, *, mode: str, live: bool, texts: list[str], precision):
    view = LiveView(tok, tok.mask_id) if live else None
    fn = infill if mode == "infill" else generate
    with precision.autocast():
        out = fn(model, ids_list, config, mask_id=tok.mask_id, eos_id=tok.eos_id, tokenizer=tok,
                 pad_id=tok.pad_id, callback=view)
    if view is not None:
        view.clear()
    if args.trace_html:
        write_trace_html(args.trace_html, tok, out, texts)
    return out


def run_infill(model, tok, config, args, *, live: bool, precision) -> int:
    """--infill: the text's "<mask>" markers filled; prints the text (or JSON)."""
    if "<mask>" not in args.infill:
        raise UserError('--infill: the text has no "<mask>" marker to fill in.')
    pieces = args.infill.split("<mask>")
    ids = [tok.bos_id] if tok.bos_id is not None else []
    for i, piece in enumerate(pieces):
        ids += tok.encode(piece, add_special_tokens=False) if piece else []
        if i < len(pieces) - 1:
            ids.append(tok.mask_id)
    note_capped_steps(config, len(ids))
    out = run_once(model, tok, [ids], config, args, mode="infill", live=live, texts=[""], precision=precision)
    filled = out.sequences[0].tolist()
    text = tok.decode(filled, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"ids": filled, "text": text, "steps": out.num_forward}, ensure_ascii=False))
    else:
        print(text)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    config = sampler_config(args)
    if args.trace_html is not None and args.chat:
        raise UserError("--trace-html replays one generation; use it with --prompt or --infill, not --chat.")
    if args.trace_html is not None and not args.trace_html.parent.is_dir():
        raise UserError(f"--trace-html: the directory {args.trace_html.parent} does not exist.")
    check_sizes(args)
    model, tok, precision = load_for_sampling(args)
    live = sys.stdout.isatty() and not args.json

    if args.infill is not None:
        return run_infill(model, tok, config, args, live=live, precision=precision)

    note_capped_steps(config, config.max_new_tokens)
    if args.chat:
        history = []
        interactive = sys.stdin.isatty()
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            if line.strip() in ("", "/exit", "/quit"):
                break
            ids = prompt_ids(tok, line, raw=False, system=args.system, history=history)
            out = run_once(model, tok, [ids], config, args, mode="generate", live=live, texts=[line],
                           precision=precision)
            answer = answer_text(tok, out.answers()[0])
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
            if args.json:
                print(json.dumps({"ids": out.answers()[0], "text": answer, "steps": out.num_forward},
                                 ensure_ascii=False), flush=True)
            else:
                print(f"model> {answer}" if interactive else answer, flush=True)
        return 0

    ids_list = [prompt_ids(tok, p, raw=args.raw, system=args.system) for p in args.prompt]
    batches = range(0, len(ids_list), args.batch_size)
    outs = [run_once(model, tok, ids_list[i:i + args.batch_size], config, args, mode="generate", live=live,
                     texts=args.prompt[i:i + args.batch_size], precision=precision) for i in batches]
    answers = [answer for out in outs for answer in out.answers()]
    texts = [answer_text(tok, a) for a in answers]
    if args.json:
        print(json.dumps({"config": asdict(config), "steps": sum(out.num_forward for out in outs),
                          "results": [{"prompt": p, "ids": a, "text": t}
                                      for p, a, t in zip(args.prompt, answers, texts)]},
                         ensure_ascii=False))
    else:
        print("\n\n".join(texts))
    return 0


if __name__ == "__main__":
    run_cli(main)
