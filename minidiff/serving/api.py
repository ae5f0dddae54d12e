"""The OpenAI-compatible objects: a request body in (a `Job`), answers, chunks and errors out.

The request's sampler fields are laid over the server's settings; every mistake is an ApiError
(a 4xx status, OpenAI's error object). Reader's page: docs/serving.md ("The API").
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from minidiff.data.chat import chat_prompt_ids
from minidiff.errors import UserError
from minidiff.plumbing.sampling_cli import answer_ids, prompt_ids
from minidiff.sampler import SamplerConfig
from minidiff.serving.settled import ended

SETTINGS = {  # request field -> (the SamplerConfig field it sets, the JSON types it takes)
    "max_tokens": ("max_new_tokens", (int,)), "max_completion_tokens": ("max_new_tokens", (int,)),
    "temperature": ("temperature", (int, float)), "seed": ("seed", (int,)), "steps": ("steps", (int,)),
    "block_length": ("block_length", (int,)), "cache": ("cache", (str,)),
    "threshold": ("threshold", (int, float, type(None))), "repetition_penalty": ("repetition_penalty", (int, float)),
}
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
              dict: "an object", type(None): "null"}


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
class Job:
    """One parsed request."""
    chat: bool  # /v1/chat/completions (else /v1/completions)
    prompt: list[int]
    config: SamplerConfig
    stream: bool
    include_usage: bool
    trace: bool
    id: str
    created: int


def typed(body: dict, name: str, types: tuple, default=None):
    """body[name] when it has one of `types` (a JSON true is not an integer), else ApiError."""
    if name not in body:
        return default
    value = body[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(TYPE_NAMES[t] for t in types)
        raise ApiError(400, f"'{name}' must be {expected}, got {json.dumps(value)}.", param=name)
    return value


def sampler_config(body: dict, base: SamplerConfig, context: int) -> SamplerConfig:
    """The server's settings with the request's laid over them, each checked by SamplerConfig."""
    config = base
    for name, (field, types) in SETTINGS.items():
        if name not in body:
            continue
        try:
            config = config.replace(**{field: typed(body, name, types)})
        except UserError as error:
            raise ApiError(400, f"'{name}' is invalid: {str(error).removeprefix('sampler config: ')}",
                           param=name) from None
    stop = typed(body, "stop", (str, list, type(None)))
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, "'stop' must be a non-empty string or an array of them.", param="stop")
        config = config.replace(stop_strings=tuple(stops))
    if config.max_new_tokens > context:
        raise ApiError(400, f"max_tokens {config.max_new_tokens} is beyond the model's context of {context} "
                       "positions.", param="max_tokens", code="context_length_exceeded")
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


def text_ids(body: dict, tok) -> list[int]:
    """The raw prompt's ids: <bos> + its text."""
    prompt = typed(body, "prompt", (str,))
    if prompt is None:
        raise ApiError(400, "'prompt' is required: a string.", param="prompt")
    return prompt_ids(tok, prompt, raw=True)


def parse_job(raw: bytes, *, chat: bool, tok, model_name: str, base: SamplerConfig, context: int) -> Job:
    """A request body -> Job, or the ApiError that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON ({error}).") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    model = typed(body, "model", (str,))
    if model is None:
        raise ApiError(400, "'model' is required: the id GET /v1/models lists.", param="model")
    if model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server has '{model_name}'.",
                       param="model", code="model_not_found")
    if typed(body, "n", (int, type(None))) not in (None, 1):
        raise ApiError(400, "only n = 1 is supported.", param="n")
    if typed(body, "logprobs", (bool, int, type(None))):
        raise ApiError(400, "logprobs are not supported.", param="logprobs")
    config = sampler_config(body, base, context)
    prompt = chat_ids(body, tok) if chat else text_ids(body, tok)
    if len(prompt) + config.max_new_tokens > context:
        raise ApiError(400, f"the prompt takes {len(prompt)} tokens and max_tokens {config.max_new_tokens} more: "
                       f"{len(prompt) + config.max_new_tokens} positions, beyond the model's context of {context}.",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    stream = typed(body, "stream", (bool, type(None))) or False
    options = typed(body, "stream_options", (dict, type(None))) or {}
    include_usage = typed(options, "include_usage", (bool, type(None))) or False
    trace = typed(body, "trace", (bool,), default=False)
    kind = "chatcmpl" if chat else "cmpl"
    return Job(chat, prompt, config, stream, include_usage, trace, f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time()))


def usage(job: Job, tok, answer: list[int]) -> dict:
    """Token counts: the prompt, the answer up to its eos or pad, both."""
    completion = len(answer_ids(tok, answer))
    return {"prompt_tokens": len(job.prompt), "completion_tokens": completion,
            "total_tokens": len(job.prompt) + completion}


def finish_reason(tok, answer: list[int]) -> str:
    """"stop" when the answer ended (eos, pad, end of turn, a stop string), else "length"."""
    return "stop" if ended(tok, answer) else "length"


def completion(job: Job, model: str, text: str, finish: str, counts: dict) -> dict:
    """The whole answer: a chat.completion or a text_completion."""
    if job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": model, "choices": [choice], "usage": counts}


def chunk(job: Job, model: str, text: str | None, finish: str | None, first: bool = False) -> dict:
    """One streamed piece (a block's settled text); text None: the usage chunk's empty choices."""
    if text is None:
        choices = []
    elif job.chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    return {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": model, "choices": choices}
