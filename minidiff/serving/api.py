"""The OpenAI-compatible objects: a request body in (a `Job`), answers, chunks and errors out.

The request's sampler fields are laid over the server's settings (null: the server's); a field
that would change the answer in a way minidiff does not implement is refused by name; every
mistake is an ApiError (a 4xx status, OpenAI's error object). Limits are checked before the
prompt is tokenized. Reader's page: docs/serving.md ("The API", "Fields").
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from minidiff.data.chat import chat_prompt_ids
from minidiff.errors import UserError
from minidiff.plumbing.sampling_cli import answer_ids, answer_text, prompt_ids
from minidiff.sampler import SamplerConfig
from minidiff.serving.settled import ended

SETTINGS = {  # request field -> (the SamplerConfig field it sets, the JSON types it takes); null: the server's
    "max_tokens": ("max_new_tokens", (int,)), "max_completion_tokens": ("max_new_tokens", (int,)),
    "temperature": ("temperature", (int, float)), "seed": ("seed", (int,)), "steps": ("steps", (int,)),
    "block_length": ("block_length", (int,)), "cache": ("cache", (str,)),
    "threshold": ("threshold", (int, float)), "repetition_penalty": ("repetition_penalty", (int, float)),
    "top_k": ("top_k", (int,)), "top_p": ("top_p", (int, float)),
}
REFUSED = {  # field -> (the values that change nothing, accepted as they are; why others are refused)
    "tools": ((None, []), "tool calls are not supported"),
    "tool_choice": ((None, "none"), "tool calls are not supported"),
    "functions": ((None, []), "function calls are not supported"),
    "function_call": ((None, "none"), "function calls are not supported"),
    "response_format": ((None, {"type": "text"}), "only the response_format {\"type\": \"text\"} is supported"),
    "logprobs": ((None, False), "log-probabilities are not supported (a diffusion model has no "
                 "left-to-right probability of its tokens)"),
    "top_logprobs": ((None, 0), "log-probabilities are not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "echo": ((None, False), "echo is not supported"),
    "best_of": ((None, 1), "best_of is not supported (no per-answer likelihood to rank by)"),
    "frequency_penalty": ((None, 0), "frequency_penalty is not supported (repetition_penalty is)"),
    "presence_penalty": ((None, 0), "presence_penalty is not supported (repetition_penalty is)"),
}
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
              dict: "an object", type(None): "null"}
MAX_STOPS, MAX_STOP_CHARS = 4, 64  # OpenAI's count; a length that keeps stop matching cheap


class ApiError(Exception):
    """A request the server cannot take: its HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What a request may ask for; checked before any work."""
    context: int  # the model's max_position_embeddings
    max_tokens: int  # max_tokens at most (and steps at most)
    max_choices: int  # n x prompts at most
    allow_trace: bool  # may /v1 requests ask for trace (the page's route always may)


@dataclass
class Job:
    """One parsed request: its prompts, each answered n times (choice p * n + j)."""
    chat: bool  # /v1/chat/completions (else /v1/completions)
    prompts: list[list[int]]
    n: int
    suffix: list[int]  # completions: given after the answer, which then fills the middle
    config: SamplerConfig
    stream: bool
    include_usage: bool
    trace: bool
    id: str
    created: int

    def configs(self) -> list[SamplerConfig]:
        """One per choice: copy j of a prompt draws with seed + j (copy 0 is the prompt alone)."""
        seed = self.config.seed
        return [self.config if seed is None or j == 0 else self.config.replace(seed=seed + j)
                for _ in self.prompts for j in range(self.n)]


def same(value, accepted) -> bool:
    """value == accepted, where a JSON boolean equals only a boolean."""
    return value == accepted and isinstance(value, bool) == isinstance(accepted, bool)


def typed(body: dict, name: str, types: tuple, default=None):
    """body[name] when it has one of `types` (a JSON true is not an integer), else ApiError."""
    if name not in body:
        return default
    value = body[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(TYPE_NAMES[t] for t in types)
        raise ApiError(400, f"'{name}' must be {expected}, got {json.dumps(value)}.", param=name)
    return value


def refuse_unsupported(body: dict, chat: bool) -> None:
    for name, (inert, why) in REFUSED.items():
        if name in body and not any(same(body[name], a) for a in inert):
            raise ApiError(400, f"{name} {json.dumps(body[name])} is refused: {why}.", param=name)
    if chat and body.get("suffix") is not None:
        raise ApiError(400, "'suffix' is for /v1/completions only.", param="suffix")
    if body.get("suffix") and body.get("stop") is not None:
        raise ApiError(400, "'stop' does not apply with a 'suffix': the middle is filled whole.", param="stop")
    typed(body, "user", (str, type(None)))


def sampler_config(body: dict, base: SamplerConfig, limits: Limits) -> SamplerConfig:
    """The server's settings with the request's laid over them, each checked by SamplerConfig."""
    config = base
    for name, (field, types) in SETTINGS.items():
        value = typed(body, name, types + (type(None),))
        try:
            config = config if value is None else config.replace(**{field: value})
        except UserError as error:
            raise ApiError(400, f"'{name}' is invalid: {str(error).removeprefix('sampler config: ')}",
                           param=name) from None
    stop = typed(body, "stop", (str, list, type(None)))
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not (len(stops) <= MAX_STOPS and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
            raise ApiError(400, f"'stop' must be a non-empty string of at most {MAX_STOP_CHARS} characters or an "
                           f"array of at most {MAX_STOPS} of them.", param="stop")
        config = config.replace(stop_strings=tuple(stops))
    for name, value in (("max_tokens", config.max_new_tokens), ("steps", config.steps)):
        if value > limits.max_tokens:
            raise ApiError(400, f"{name} {value} is beyond this server's limit of {limits.max_tokens}.",
                           param=name, code="context_length_exceeded" if name == "max_tokens" else None)
    return config


def chat_ids(body: dict, tok) -> list[int]:
    """The conversation's prompt ids: the chat template, ending with the generation prompt."""
    messages = typed(body, "messages", (list,))
    if not messages:
        raise ApiError(400, "'messages' is required: a non-empty array of {role, content}.", param="messages")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("content"), str)
                and message.get("role") in ("system", "user", "assistant")):
            raise ApiError(400, f"messages[{i}] must be an object with a role (system, user or assistant) "
                           "and a string content.", param=f"messages[{i}]")
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's.", param="messages")
    try:
        return chat_prompt_ids([{"role": m["role"], "content": m["content"]} for m in messages], tok)
    except UserError as error:
        raise ApiError(400, str(error), param="messages") from None


def prompt_items(body: dict) -> list:
    """The prompts of /v1/completions: a string, an array of strings, token ids, or an array of those."""
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]


def text_prompts(body: dict, tok) -> list[list[int]]:
    """The raw prompts' ids; a string is <bos> + its text."""
    out = []
    for item in prompt_items(body):
        if isinstance(item, str):
            out.append(prompt_ids(tok, item, raw=True))
        elif (isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool)
                                                     and 0 <= t < tok.vocab_size for t in item)):
            out.append(item)
        else:
            raise ApiError(400, "'prompt' is required: a string, an array of strings, an array of token ids "
                           f"(each below {tok.vocab_size}) or an array of those.", param="prompt")
    return out


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error}).") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    return body


def parse_job(raw: bytes, *, chat: bool, tok, model_name: str, base: SamplerConfig, limits: Limits,
              trace_allowed: bool = False) -> Job:
    """A request body -> Job, or the ApiError that says what is wrong with it."""
    body = parse_body(raw)
    model = typed(body, "model", (str,))
    if model is None:
        raise ApiError(400, "'model' is required: the id GET /v1/models lists.", param="model")
    if model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server has '{model_name}'.",
                       param="model", code="model_not_found")
    refuse_unsupported(body, chat)
    config = sampler_config(body, base, limits)
    trace = typed(body, "trace", (bool, type(None))) or False
    if trace and not (limits.allow_trace or trace_allowed):
        raise ApiError(400, "'trace' needs a server started with --allow-trace.", param="trace")
    n = typed(body, "n", (int, type(None)))
    n = 1 if n is None else n
    count = n * (1 if chat else len(prompt_items(body)))
    if not (n >= 1 and count <= limits.max_choices):
        raise ApiError(400, f"n must be >= 1 and n x prompts at most {limits.max_choices}, got n = {n} and "
                       f"{count} choices.", param="n")
    suffix = typed(body, "suffix", (str, type(None)))
    suffix_ids = tok.encode(suffix, add_special_tokens=False) if suffix else []
    prompts = [chat_ids(body, tok)] if chat else text_prompts(body, tok)
    longest = max(len(p) for p in prompts) + config.max_new_tokens + len(suffix_ids)
    if longest > limits.context:
        raise ApiError(400, f"the prompt{', the suffix' if suffix_ids else ''} and max_tokens {config.max_new_tokens} "
                       f"take {longest} positions, beyond the model's context of {limits.context}.",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    stream = typed(body, "stream", (bool, type(None))) or False
    options = typed(body, "stream_options", (dict, type(None))) or {}
    include_usage = typed(options, "include_usage", (bool, type(None))) or False
    kind = "chatcmpl" if chat else "cmpl"
    return Job(chat, prompts, n, suffix_ids, config, stream, include_usage, trace,
               f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time()))


def text_of(job: Job, tok, answer: list[int]) -> str:
    """A choice's text: the answer up to its end, stripped; with a suffix, the whole middle."""
    return tok.decode(answer, skip_special_tokens=True) if job.suffix else answer_text(tok, answer)


def text_tokens(job: Job, tok, answer: list[int], text: str) -> int:
    """The answer's tokens that make up its text: without the end of turn, spaces the strip drops,
    eos and padding (a middle: all of it)."""
    ids = answer if job.suffix else answer_ids(tok, answer)
    while ids and not job.suffix and answer_text(tok, ids[:-1]) == text:
        ids = ids[:-1]
    return len(ids)


def usage(job: Job, tok, answers: list[list[int]], texts: list[str]) -> dict:
    """Token counts: the prompts (and suffix), the tokens of the texts returned, both."""
    prompt = sum(len(p) + len(job.suffix) for p in job.prompts)
    completion = sum(text_tokens(job, tok, a, t) for a, t in zip(answers, texts))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(job: Job, tok, answer: list[int]) -> str:
    """"stop" when the answer ended (eos, pad, end of turn, a stop string), else "length"."""
    return "stop" if not job.suffix and ended(tok, answer) else "length"


def choice(job: Job, index: int, text: str | None, finish: str | None, first: bool = False,
           delta: bool = False) -> dict:
    """One choice of an answer (delta: of a chunk)."""
    if not job.chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if not delta:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"index": index, "delta": {"role": "assistant", "content": text} if first else {"content": text},
            "finish_reason": finish}


def completion(job: Job, model: str, choices: list[dict], counts: dict | None, chunked: bool = False) -> dict:
    """The whole answer (a chat.completion or a text_completion), or one chunk of a stream."""
    kind = ("chat.completion.chunk" if chunked else "chat.completion") if job.chat else "text_completion"
    body = {"id": job.id, "object": kind, "created": job.created, "model": model, "choices": choices}
    return body if counts is None else {**body, "usage": counts}
