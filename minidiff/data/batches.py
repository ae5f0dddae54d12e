"""Batches: the order in which a run visits its examples, and the padding that makes tensors of them
(docs/training.md, "Batches"). References: dllm's `DataCollatorForSeq2Seq` padding for SFT; torch's
DistributedSampler for the last batch.

    batches = Batches(examples, 16, seed=0, rank=r, world_size=w, collate=lambda b: collate_sft(b, tok.pad_id))
    batch = next(batches)          # input_ids [B, S], labels [B, S], maskable [B, S]
    state = batches.state_dict()   # the next batch's position: a resumed run continues there
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from minidiff.data.examples import IGNORE
from minidiff.errors import UserError


def collate_cpt(batch: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad to the longest (or `pad_to`); attention_mask is None without padding; maskable = real tokens."""
    length = max(len(seq) for seq in batch) if pad_to is None else pad_to
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)  # [B, S]
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # [B, S]
    for i, seq in enumerate(batch):
        input_ids[i, :len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        attention_mask[i, :len(seq)] = 1
    padded = any(len(seq) < length for seq in batch)  # known on the host: no device read
    return {"input_ids": input_ids, "attention_mask": attention_mask if padded else None,
            "maskable": attention_mask.bool()}


def collate_sft(batch: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, eos_id: int | None = None,
                *, fill: str = "pad", pad_to: int | None = None) -> dict:
    """Right-pad (input_ids, labels) pairs with pad or eos, labels too (the padding is trained); no attention mask."""
    if fill not in ("pad", "eos") or (fill == "eos" and eos_id is None):
        raise UserError(f"fill={fill!r} is not valid; expected 'pad', or 'eos' together with eos_id")
    fill_id = pad_id if fill == "pad" else eos_id
    length = max(len(ids) for ids, _ in batch) if pad_to is None else pad_to
    input_ids = torch.full((len(batch), length), fill_id, dtype=torch.long)  # [B, S]
    labels = torch.full((len(batch), length), fill_id, dtype=torch.long)  # [B, S]
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        labels[i, :len(lab)] = torch.as_tensor(np.asarray(lab, dtype=np.int64))
    return {"input_ids": input_ids, "labels": labels, "maskable": labels != IGNORE, "attention_mask": None}


class Batches:
    """Deterministic, resumable, shardable, endless batches; drop_last=False fills an epoch's last from its start."""

    def __init__(self, examples: Sequence, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, collate: Callable | None = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"batch_size={batch_size}, rank={rank}, world_size={world_size} are not valid")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world_size, self.drop_last, self.collate = rank, world_size, drop_last, collate
        self.global_batch_size = batch_size * world_size
        n = len(examples)
        steps = n // self.global_batch_size if drop_last else math.ceil(n / self.global_batch_size)
        if steps == 0:
            raise UserError(f"only {n} examples: fewer than one global batch of {batch_size} x {world_size} "
                            "processes; lower --batch-size or add data")
        self.steps_per_epoch, self.epoch, self.step_in_epoch = steps, 0, 0
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._order_epoch = epoch
        return self._order

    def indices(self, epoch: int, step: int) -> list[int]:
        order = self.order(epoch)
        start = step * self.global_batch_size + self.rank * self.batch_size
        positions = [(start + i) % len(order) for i in range(self.batch_size)]  # wraps only when drop_last=False
        return [int(order[p]) for p in positions]

    def __iter__(self):
        return self

    def __next__(self):
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        batch = [self.examples[i] for i in self.indices(self.epoch, self.step_in_epoch)]
        self.step_in_epoch += 1
        return self.collate(batch) if self.collate is not None else batch

    def state_dict(self) -> dict:
        """The next batch's position (in global steps) plus what it is only valid for."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "num_examples": len(self.examples), "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_examples", len(self.examples)),
                          ("global_batch_size", self.global_batch_size)):
            if key in state and state[key] != mine:
                raise UserError(f"cannot resume the data position: the checkpoint has {key}={state[key]}, "
                                f"this run has {mine}; use the same data, seed and global batch size")
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
