"""What the sampling scripts (sample.py, serve.py) share: the sampler's flags, a prompt's ids and
an answer's text, so that the same settings and prompt give the same answer through either.
References: none (plumbing); FastConfig (minidiff/speed/sampling.py), the chat format (data/chat.py).

    add_sampler_flags(parser)              # --preset and one flag per FastConfig field
    config = sampler_config(args)          # a FastConfig: the preset with the flags given laid over it
    model, tok, precision = load_for_sampling(args)  # --model, --device, --dtype, --no-packed-weights
    ids = prompt_ids(tok, "Merhaba", raw=False)
    text = answer_text(tok, out.answers()[0])
"""
from __future__ import annotations

from dataclasses import fields

import minidiff
from minidiff.data.chat import END_OF_TURN, chat_prompt_ids
from minidiff.errors import UserError
from minidiff.plumbing import flags
from minidiff.plumbing.device import check_available, enable_tf32, inference_precision, resolve_device
from minidiff.speed.sampling import CACHES, FastConfig

SAMPLER_HELP = {  # help texts of the FastConfig fields (the flags override the preset)
    "remasking": "low_confidence | random",
    "stochastic": "Binomial transfer counts",
    "unmasking": "unmasking schedule (how many tokens each step commits): dllm | llada",
    "threshold": "parallel decoding: commit every candidate this confident",
    "top_k": "with --temperature: draw from the K most likely tokens only (0: all)",
    "top_p": "with --temperature: draw from the most likely tokens holding this mass only (1: all)",
    "stop_strings": "strings that end the answer (none: give the flag alone)",
    "stop_at_eos": "stop once every answer has eos or [/Answer] in a finished block",
    "cache": "key/value cache across a block's steps (Fast-dLLM, approximate): none = exact, "
             "prefix = reuse what precedes the block, dual = run only the block",
    "cache_refresh": "with --cache: refill the cache every N steps of a block (default: block start only)",
    "compile": "torch.compile the fixed-shape step (CUDA graphs on a GPU); the first call compiles",
    "length_bucket": "pad every canvas to a multiple of this and batch only rows of one padded length, so that "
                     "an answer is the same alone or in any batch, bit for bit (0: pad to the batch's longest)",
}


def add_sampler_flags(parser):
    """--preset and, in their own group, one flag per FastConfig field; returns the group."""
    parser.add_argument("--preset", choices=sorted(FastConfig.PRESETS), help="start from these sampler settings")
    group = parser.add_argument_group("sampler (the algorithm's and the fast loop's settings; override the preset)")
    flags.add_fields(group, FastConfig, helps=SAMPLER_HELP, choices={"cache": list(CACHES)},
                     nargs={"stop_strings": "*"})
    return group


def sampler_config(args) -> FastConfig:
    """The preset (or the defaults) with every flag that was given laid over it."""
    chosen = {f.name: getattr(args, f.name) for f in fields(FastConfig) if getattr(args, f.name, None) is not None}
    if "stop_strings" in chosen:
        chosen["stop_strings"] = tuple(chosen["stop_strings"])
    return FastConfig.preset(args.preset, **chosen) if args.preset else FastConfig(**chosen)


def load_for_sampling(args):
    """(model, tokenizer, precision) of --model on --device, in the precision of --dtype and
    --no-packed-weights (device.add_precision_flags); UserError when the two do not match."""
    device = resolve_device(args.device)
    precision = inference_precision(args.dtype, device, pack=not args.no_packed_weights)
    check_available(device)
    enable_tf32(device)
    tok = minidiff.load_tokenizer(args.model)
    model = precision.prepare(minidiff.load_model(args.model))
    if tok.mask_id >= model.config.vocab_size:
        raise UserError(f"the tokenizer's mask id {tok.mask_id} is outside the model's vocabulary "
                        f"of {model.config.vocab_size}; tokenizer and model do not match.")
    return model, tok, precision


def prompt_ids(tok, text: str, *, raw: bool, system: str | None = None, history=()) -> list[int]:
    """The prompt's token ids. Chat (default): the templated conversation exactly as SFT training
    saw it (data.chat_prompt_ids: no special tokens, ends with the generation prompt
    "[Answer]\\n"). Raw: <bos> + the text, without the post-processor's closing <eos> (as a CPT
    document starts); the answer's masks follow the prompt directly."""
    if not raw:
        messages = ([{"role": "system", "content": system}] if system else []) + list(history)
        return chat_prompt_ids(messages + [{"role": "user", "content": text}], tok)
    ids = tok.encode(text, add_special_tokens=False)
    return ([tok.bos_id] if tok.bos_id is not None else []) + ids


def answer_ids(tok, ids: list[int]) -> list[int]:
    """The answer's ids up to the first eos or pad (SFT teaches the model to end with padding)."""
    ends = [ids.index(t) for t in (tok.eos_id, tok.pad_id) if t is not None and t in ids]
    return ids[: min(ends)] if ends else list(ids)


def answer_text(tok, ids: list[int]) -> str:
    """The answer: up to the first eos or pad, then up to the end-of-turn string, stripped."""
    text = tok.decode(answer_ids(tok, ids), skip_special_tokens=True)
    return text.split(END_OF_TURN)[0].strip()
