"""A synthetic instruction set with known answers and controlled response lengths (chapter 6, SFT).

Three tasks, each answer fully determined by its prompt, so that "exactly right" and "stopped too early"
are facts, not judgements:

- ``repeat``: ``R:ab*3>`` -> ``ababab|``;
- ``count``: ``C:7>`` -> ``1234567|``;
- ``reverse``: ``V:word>`` -> ``drow|``.

Every response ends with the stop token ``|``; ``_`` pads a batch. :func:`instruction_batch` turns
examples into next-token inputs and targets with the prompt masked (or not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import CharTokenizer
from .losses import IGNORE_INDEX

INSTRUCTION_TASKS = ("repeat", "count", "reverse")
INSTRUCTION_STOP = "|"  # ends every response; generating it is how a model says "done"
INSTRUCTION_PAD = "_"  # fills a batch row after the stop token; never takes a loss
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
INSTRUCTION_VOCAB = _LETTERS + "0123456789" + "RCV:*>" + INSTRUCTION_STOP + INSTRUCTION_PAD


@dataclass(frozen=True)
class Instruction:
    """One example: ``prompt`` (ends with ``>``), the one correct ``response`` (ends with the stop
    token), the ``task`` it comes from and the response's length in characters, stop token included."""

    task: str
    prompt: str
    response: str

    @property
    def response_length(self) -> int:
        return len(self.response)


def make_instruction(task: str, length: int, generator: torch.Generator) -> Instruction:
    """An instruction whose correct response is ``length`` characters long, stop token included.

    - ``repeat``: ``R:ab*3>`` -> ``ababab|`` (a random pattern of 1-3 letters whose length divides
      ``length - 1``, repeated).
    - ``count``: ``C:7>`` -> ``1234567|`` (digits 1, 2, ..., n written mod 10).
    - ``reverse``: ``V:word>`` -> ``drow|`` (a random word of ``length - 1`` letters, reversed).
    """
    if task not in INSTRUCTION_TASKS:
        raise ValueError(f"task must be one of {INSTRUCTION_TASKS}, got {task!r}")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2 (one character and the stop token), got {length!r}")
    n = length - 1  # characters before the stop token

    def letters(k: int) -> str:
        return "".join(_LETTERS[i] for i in torch.randint(0, 26, (k,), generator=generator).tolist())

    if task == "repeat":
        sizes = [k for k in (1, 2, 3) if n % k == 0]
        size = sizes[int(torch.randint(0, len(sizes), (1,), generator=generator))]
        pattern = letters(size)
        return Instruction(task, f"R:{pattern}*{n // size}>", pattern * (n // size) + INSTRUCTION_STOP)
    if task == "count":
        return Instruction(task, f"C:{n}>", "".join(str(i % 10) for i in range(1, n + 1)) + INSTRUCTION_STOP)
    word = letters(n)
    return Instruction(task, f"V:{word}>", word[::-1] + INSTRUCTION_STOP)


def make_instructions(n: int, generator: torch.Generator, *, lengths: tuple[int, int] = (2, 49),
                      tasks=INSTRUCTION_TASKS) -> list[Instruction]:
    """``n`` instructions with tasks drawn uniformly from ``tasks`` and response lengths drawn uniformly
    from ``lengths[0]`` to ``lengths[1]`` inclusive (stop token included)."""
    lo, hi = lengths
    if not 2 <= lo <= hi:
        raise ValueError(f"lengths must satisfy 2 <= low <= high, got {lengths}")
    if n < 1 or not tasks or any(t not in INSTRUCTION_TASKS for t in tasks):
        raise ValueError(f"need n >= 1 and tasks from {INSTRUCTION_TASKS}, got n={n}, tasks={tasks}")
    out = []
    for _ in range(n):
        task = tasks[int(torch.randint(0, len(tasks), (1,), generator=generator))]
        length = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        out.append(make_instruction(task, length, generator))
    return out


@dataclass
class InstructionBatch:
    """Next-token training tensors for a batch of instructions, prompt and response in one row.

    - ``x`` (B, T) int64 inputs, padded with the pad token;
    - ``y`` (B, T) int64 targets, ``x`` shifted by one, ``IGNORE_INDEX`` at padding; prompt positions keep
      their targets, so whether the prompt takes a loss is the loss's choice
      (:func:`minigpt.losses.mask_prompt` with ``prompt_lengths`` masks it);
    - ``prompt_lengths`` (B,) int64: how many leading positions of each row predict prompt characters.
    """

    x: torch.Tensor
    y: torch.Tensor
    prompt_lengths: torch.Tensor

    def to(self, device: torch.device | str) -> "InstructionBatch":
        dev = torch.device(device)
        if dev.type == "cpu":
            return self
        return InstructionBatch(*(t.to(dev, non_blocking=True) for t in (self.x, self.y, self.prompt_lengths)))

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, T) bool: True where ``y`` is a response character or the stop token."""
        positions = torch.arange(self.y.shape[1], device=self.y.device)
        return (positions[None, :] >= self.prompt_lengths[:, None]) & (self.y != IGNORE_INDEX)


def instruction_batch(examples: list[Instruction], tokenizer: CharTokenizer | None = None) -> InstructionBatch:
    """Token ids for next-token training on prompt + response, one row per example, right-padded.

    T is the longest example's length minus one. Built on the CPU (ids are checked there, where it costs
    no device synchronisation); move it with :meth:`InstructionBatch.to`.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    tok = tokenizer or CharTokenizer(INSTRUCTION_VOCAB)
    seqs = [tok.encode(e.prompt + e.response) for e in examples]
    T = max(len(s) for s in seqs) - 1
    pad = tok.stoi[INSTRUCTION_PAD]
    x = torch.full((len(seqs), T), pad, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids = torch.tensor(s, dtype=torch.long)
        x[i, : len(s) - 1] = ids[:-1]
        y[i, : len(s) - 1] = ids[1:]
    # the position whose target is the response's first character
    prompt_lengths = torch.tensor([len(e.prompt) - 1 for e in examples], dtype=torch.long)
    return InstructionBatch(x, y, prompt_lengths)
