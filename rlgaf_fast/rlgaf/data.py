"""Demonstrations and prompts: loading (``datasets``), tokenising, batching.

An example is a prompt and a response. Datasets may hold token ids (``prompt_ids``,
``response_ids``) or text (``prompt``, ``response``, tokenised here; the response gets the EOS
token appended). JSON Lines files with those fields load directly.

Batches are drawn by index from a generator seeded by (seed, step, rank, stream), so a batch
depends only on where the run is, not on what ran before: resuming from a checkpoint draws the
same batches as the uninterrupted run, and each process of a distributed run draws its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

STREAM_DEMOS, STREAM_PROMPTS, STREAM_SAMPLING, STREAM_SHUFFLE, STREAM_GUMBEL, STREAM_MLE = range(6)


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0, sub: int = 0) -> int:
    """A 63-bit seed for (run seed, step, process rank, random stream, sub-draw within the
    step), well mixed (splitmix64 finaliser) so that neighbouring inputs get unrelated seeds."""
    x = (
        seed * 0x9E3779B97F4A7C15
        + step * 0xBF58476D1CE4E5B9
        + rank * 0x94D049BB133111EB
        + stream * 0xD6E8FEB86659FD93
        + sub * 0xA0761D6478BD642F
    ) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def load_examples(source: Any, tokenizer: Any = None, eos_token_id: int | None = None):
    """A ``datasets.Dataset`` with integer-list columns ``prompt_ids`` and ``response_ids``.

    source: a path to a JSON Lines (or JSON) file, a ``datasets.Dataset``, or a list of dicts.
    Rows need ``prompt_ids``/``response_ids`` or ``prompt``/``response`` text (then ``tokenizer``
    is required; ``eos_token_id`` defaults to the tokenizer's and is appended to responses).
    """
    import datasets

    if isinstance(source, (str, Path)):
        check_examples_file(source)
        dataset = datasets.load_dataset("json", data_files=str(source), split="train")
    elif isinstance(source, list):
        dataset = datasets.Dataset.from_list(source)
    elif isinstance(source, datasets.Dataset):
        dataset = source
    else:
        raise TypeError(
            f"source must be a path, a list of dicts or a datasets.Dataset, "
            f"got {type(source).__name__}"
        )
    columns = set(dataset.column_names)
    if "prompt_ids" in columns:
        if "response_ids" not in columns:  # a prompts-only dataset
            dataset = dataset.map(lambda row: {"response_ids": []})
        return dataset
    if "prompt" not in columns:
        where = f"{source}: " if isinstance(source, (str, Path)) else ""
        raise ValueError(
            f"{where}examples need a prompt_ids or prompt column (and response_ids or "
            f"response for demonstrations), got {sorted(columns)}"
        )
    if tokenizer is None:
        raise ValueError("text examples (prompt/response) need a tokenizer")
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id

    def tokenize(row: dict) -> dict:
        response = []
        if row.get("response") is not None:
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            response = response + ([eos] if eos is not None else [])
        prompt = tokenizer(row["prompt"])["input_ids"]  # with the model's BOS, if it has one
        if len(prompt) > 1 and eos is not None and prompt[-1] == eos:
            prompt = prompt[:-1]  # tokenizers that close every text with EOS: the response follows
        return {"prompt_ids": prompt, "response_ids": response}

    return dataset.map(tokenize)


def check_examples_file(path: str | Path, what: str = "examples") -> None:
    """Raise FileNotFoundError if ``path`` is not a file, or ValueError naming the line of the
    first record that is not a JSON object, so that a bad file fails before any model is built
    and with its line number (``datasets`` reports neither)."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"{what} file {path} {problem}; give a JSON Lines file, one object per line "
            "with prompt_ids/response_ids (or prompt/response)"
        )
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            json.loads(text)
            return  # one JSON document, which datasets also reads
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # else: JSON Lines under a .json name
                raise ValueError(
                    f"{path}, line {error.lineno}: malformed JSON ({error.msg} at column "
                    f"{error.colno})"
                ) from error
    records = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        records += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}, line {number}: malformed JSON Lines record ({error.msg} at column "
                f"{error.colno}); each line must be one JSON object"
            ) from error
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}, line {number}: expected a JSON object, got {type(record).__name__}"
            )
    if not records:
        raise ValueError(f"{what} file {path} is empty; it needs one JSON object per line")


@dataclass
class Batch:
    """Token ids of B examples: prompts left-padded to P, responses right-padded to T."""

    prompt_ids: Tensor  # [B, P] int64
    prompt_mask: Tensor  # [B, P] int64, 1 on real tokens
    response_ids: Tensor  # [B, T] int64
    response_mask: Tensor  # [B, T] int64

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask)
            )
        )


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.int64)
            mask[i, width - len(r) :] = 1
    return ids, mask


def pad_right(
    rows: list[list[int]], pad_id: int, width: int | None = None
) -> tuple[Tensor, Tensor]:
    width = max(1, max(len(r) for r in rows)) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, r in enumerate(rows):
        r = r[:width]
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
            mask[i, : len(r)] = 1
    return ids, mask


class ExampleSampler:
    """Draws random batches (with replacement across steps, without within a batch) from a
    tokenised dataset. The rows are kept as Python lists: datasets here are small enough, and
    indexing a list is cheaper than an Arrow table per batch."""

    def __init__(
        self, dataset: Any, pad_id: int, max_response_len: int, max_prompt_len: int | None = None
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        # A prompt's end is what the response continues: truncate from the left.
        self.prompts = [
            list(p)[-max_prompt_len:] if max_prompt_len else list(p) for p in dataset["prompt_ids"]
        ]
        self.responses = [list(r) for r in dataset["response_ids"]]
        self.pad_id = pad_id
        self.max_response_len = max_response_len

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def longest_prompt(self) -> int:
        return max(len(p) for p in self.prompts)

    def batch(self, batch_size: int, seed: int) -> Batch:
        generator = torch_generator(seed)
        if batch_size <= len(self):
            index = torch.randperm(len(self), generator=generator)[:batch_size]
        else:
            index = torch.randint(len(self), (batch_size,), generator=generator)
        return self.take(index.tolist())

    def for_prompts(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Batch:
        """The demonstrations of the prompts ``[B, P]`` (int64, left-padded, mask 1 on real
        tokens), row for row: for each, the first example whose (truncated) prompt has the same
        tokens. ValueError if a prompt has none."""
        if not hasattr(self, "_index_of_prompt"):
            self._index_of_prompt: dict[tuple[int, ...], int] = {}
            for i, p in enumerate(self.prompts):
                self._index_of_prompt.setdefault(tuple(p), i)
        index = []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True):
            key = tuple(t for t, m in zip(ids, mask, strict=True) if m)
            if key not in self._index_of_prompt:
                raise ValueError(f"no demonstration has the prompt {list(key)}")
            index.append(self._index_of_prompt[key])
        return self.take(index)

    def missing_prompts(self, prompts: ExampleSampler) -> int:
        """How many of ``prompts``' prompts have no demonstration here."""
        known = set(map(tuple, self.prompts))
        return sum(tuple(p) not in known for p in prompts.prompts)

    def take(self, index: list[int]) -> Batch:
        prompt_ids, prompt_mask = pad_left([self.prompts[i] for i in index], self.pad_id)
        response_ids, response_mask = pad_right(
            [self.responses[i][: self.max_response_len] for i in index], self.pad_id
        )
        return Batch(prompt_ids, prompt_mask, response_ids, response_mask)


def synthetic_examples(
    num_examples: int,
    vocab_size: int = 32,
    *,
    seed: int = 0,
    eos_token_id: int = 1,
    pad_token_id: int = 0,
) -> list[dict]:
    """Generated demonstrations for tests and the ``tiny`` preset: prompts of 1 to 4 random
    tokens; the expert's response counts up from the prompt's last token (mod the vocabulary,
    skipping pad and EOS) for 3 to 8 tokens, then EOS. Learnable, and easy to tell from noise."""
    generator = torch_generator(seed)
    first = max(pad_token_id, eos_token_id) + 1
    span = vocab_size - first
    rows = []
    for _ in range(num_examples):
        prompt_len = int(torch.randint(1, 5, (1,), generator=generator))
        response_len = int(torch.randint(3, 9, (1,), generator=generator))
        prompt = (torch.randint(span, (prompt_len,), generator=generator) + first).tolist()
        response = [first + (prompt[-1] - first + k) % span for k in range(1, response_len + 1)]
        rows.append({"prompt_ids": prompt, "response_ids": response + [eos_token_id]})
    return rows
