"""The chat format: template, SFT rendering, prompt ids, end of turn and stop strings.

References: dllm's plain-text chat template for BERT-style models (what Diffutron's SFT used);
Diffutron (arXiv 2603.20466) and its dllm fork's stop strings. The markers are ordinary text,
not special tokens, and a rendering holds no <bos>/<eos>:

    [SYS]\\n{system}\\n[/SYS]\\n\\n          (only when the first message is a system one)
    [Question]\\n{user}\\n[/Question]\\n\\n  (each user turn)
    [Answer]\\n{assistant}\\n[/Answer]\\n\\n (each assistant turn)
    [Answer]\\n                            (generation prompt, unless the last turn is the assistant's)

`StopRules` end an answer at END_OF_TURN or cut it at the first of FORK_STOP_STRINGS (docs/sampler.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minidiff.errors import UserError
from minidiff.sampler import FORK_STOP_STRINGS, Canvas, SamplerConfig  # noqa: F401 (the presets' stop strings)

END_OF_TURN = "[/Answer]"  # closes every assistant turn; a sampled answer ends here
FORK_STOP_REPLACEMENT = f"\n{END_OF_TURN}\n"  # what the fork writes where a stop string began
SFT_FORMATS = ("alpaca", "instructurca", "messages")


def render_chat(messages, add_generation_prompt: bool = True) -> str:
    """The template above; contents stripped of surrounding whitespace."""
    if not isinstance(messages, (list, tuple)):
        raise UserError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"chat message {i} must be a dict with a str 'content'; got {message!r}")
        role, content = message.get("role"), message["content"].strip()
        if role == "system" and i == 0:
            parts.append(f"[SYS]\n{content}\n[/SYS]\n\n")
        elif role == "user":
            parts.append(f"[Question]\n{content}\n[/Question]\n\n")
        elif role == "assistant":
            parts.append(f"[Answer]\n{content}\n{END_OF_TURN}\n\n")
        else:
            where = "only as the first message" if role == "system" else "user, assistant or a first system"
            raise UserError(f"chat message {i} has role {role!r}; expected {where}")
    turns = [m for m in messages if m["role"] != "system"]
    if add_generation_prompt and (not turns or turns[-1]["role"] != "assistant"):
        parts.append("[Answer]\n")
    return "".join(parts)


def sft_messages(row: dict, fmt: str, where: str = "row") -> list[dict]:
    """One SFT row's conversation: alpaca (instruction [+ input], output), instructurca (Input, Output), messages."""
    if fmt not in SFT_FORMATS:
        raise UserError(f"SFT format {fmt!r} is unknown; expected one of {', '.join(SFT_FORMATS)}")
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction", where)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise UserError(f"{where}: field 'input' is not a string")
        user = instruction.strip() + ("\n\n" + extra.strip() if extra and extra.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text_field(row, "output", where)}]
    if fmt == "instructurca":
        lower = {str(k).lower(): k for k in row}
        if not {"input", "output"} <= lower.keys():
            raise UserError(f"{where}: no field 'Input'/'Output' for format instructurca (has {sorted(row)})")
        return [{"role": "user", "content": _text_field(row, lower["input"], where)},
                {"role": "assistant", "content": _text_field(row, lower["output"], where)}]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: no field 'messages' (a non-empty list of {{role, content}}) for format messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") \
                or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: messages[{i}] is not a {{role: system|user|assistant, content: str}} object")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message has role {messages[-1]['role']!r}; expected the assistant answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _text_field(row: dict, name: str, where: str) -> str:
    value = row.get(name)
    if value is None:
        raise UserError(f"{where}: no field '{name}'")
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' is not a string")
    return value


def render_sft(row: dict, fmt: str, tokenizer, where: str = "row") -> tuple[str, str]:
    """(prompt, answer) texts of one SFT row: the generation prompt's rendering, then the rest of the full one."""
    messages = sft_messages(row, fmt, where)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not full.startswith(prompt):  # the template must render the answer after the generation prompt
        raise ValueError(f"chat template: the generation prompt {prompt[-20:]!r} is not a prefix of the answer turn")
    return prompt, full[len(prompt):]


def chat_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of a chat prompt as SFT training saw it (template + generation prompt, no specials)."""
    return list(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                 add_special_tokens=False))


def _find_stop(tokenizer, ids: list[int], stop_strings) -> int | None:
    """Index into ids of the first token where any stop string begins (decoded text), or None."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    hits = [text.find(s) for s in stop_strings if s in text]
    if not hits:
        return None
    char = min(hits)
    for n in range(len(ids) + 1):  # the first prefix whose text reaches past the stop's start
        if len(tokenizer.decode(ids[:n], skip_special_tokens=False)) > char:
            return max(n - 1, 0)
    return len(ids)


def _ended(tokenizer, ids: list[int], eos_id: int, pad_id: int) -> bool:
    """Has this answer ended: eos, pad (SFT trains padding) or END_OF_TURN?"""
    if eos_id in ids or pad_id in ids:
        return True
    return tokenizer is not None and END_OF_TURN in tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class StopRules:
    """What ends the answers, checked once per block on the host: stop strings, and `stop_at_eos`."""
    stop_strings: tuple[str, ...]
    stop_at_eos: bool
    tokenizer: object | None  # decodes the answers (stop strings, "[/Answer]"); None: eos and pad only
    pad_id: int  # what SFT pads answers with
    replacement: list[int] | None  # the ids of FORK_STOP_REPLACEMENT; None: no stop strings

    @classmethod
    def make(cls, config: SamplerConfig, tokenizer, pad_id: int | None, eos_id: int) -> "StopRules":
        stops = config.stop_strings and tokenizer is not None
        replacement = tokenizer.encode(FORK_STOP_REPLACEMENT, add_special_tokens=False) if stops else None
        # the pad id: given, else the tokenizer's, else eos
        pad_id = getattr(tokenizer, "pad_id", None) if pad_id is None else pad_id
        return cls(config.stop_strings, config.stop_at_eos, tokenizer, eos_id if pad_id is None else pad_id,
                   replacement)

    def cut_at_stop_string(self, ids, r: int, row: list[int], start: int, end: int, answer_end: int) -> bool:
        """In place on row r: from the first stop string in row[start:end] to the answer end, replacement + pad."""
        cut = _find_stop(self.tokenizer, row[start:end], self.stop_strings)
        if cut is None:
            return False
        first = start + cut
        fill = (self.replacement + [self.pad_id] * answer_end)[: answer_end - first]
        ids[r, first:answer_end] = torch.tensor(fill, dtype=ids.dtype, device=ids.device)
        return True

    def end_of_block(self, ids, canvas: Canvas, block, last: bool) -> bool:
        """After the block [B, K], in place on ids [B, T]: cut at stop strings, then the early stop. True: stop now."""
        if not (self.replacement is not None or self.stop_at_eos):
            return False
        block_end, rows = block[:, -1].tolist(), ids.tolist()
        finished = []
        for r, (row, start, answer_end) in enumerate(zip(rows, canvas.answer_start, canvas.answer_end)):
            end = min(block_end[r] + 1, answer_end)
            if self.replacement is not None and self.cut_at_stop_string(ids, r, row, start, end, answer_end):
                row = ids[r].tolist()
            finished.append(_ended(self.tokenizer, row[start:end], canvas.eos_id, self.pad_id) or
                            (self.replacement is not None and canvas.mask_id not in row[start:answer_end]))
        if not self.stop_at_eos or last or not any(finished):
            return False
        # the rest of a finished answer is padding now, as alone (masks a prompt may hold stay as they are)
        span = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, T]
        answers = ((span >= torch.tensor(canvas.answer_start, device=ids.device)[:, None]) &
                   (span < torch.tensor(canvas.answer_end, device=ids.device)[:, None]))  # [B, T]
        done = torch.tensor(finished, device=ids.device)[:, None]  # [B, 1]
        ids.masked_fill_(answers & done & (ids == canvas.mask_id), canvas.eos_id)
        return all(finished)
