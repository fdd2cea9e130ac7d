"""The synthetic instruction data set of minigpt.instructions (chapter 6): known answers, controlled lengths."""

import pytest
import torch

from minigpt.data import CharTokenizer
from minigpt.instructions import (INSTRUCTION_STOP, INSTRUCTION_VOCAB, instruction_batch, make_instruction,
                                  make_instructions)
from minigpt.losses import IGNORE_INDEX, mask_prompt


@pytest.mark.parametrize("length", [2, 3, 7, 13, 48])
def test_each_task_gives_the_right_answer_at_the_asked_length(length):
    gen = torch.Generator().manual_seed(length)
    rep = make_instruction("repeat", length, gen)
    pattern, times = rep.prompt[2:-1].split("*")
    assert rep.response == pattern * int(times) + INSTRUCTION_STOP
    count = make_instruction("count", length, gen)
    n = int(count.prompt[2:-1])
    assert count.response == "".join(str(i % 10) for i in range(1, n + 1)) + INSTRUCTION_STOP
    rev = make_instruction("reverse", length, gen)
    assert rev.response == rev.prompt[2:-1][::-1] + INSTRUCTION_STOP
    for e in (rep, count, rev):
        assert e.response_length == length and e.prompt.endswith(">")
        assert INSTRUCTION_STOP not in e.prompt and e.response.count(INSTRUCTION_STOP) == 1


def test_lengths_cover_the_range_and_the_draw_is_reproducible():
    a = make_instructions(600, torch.Generator().manual_seed(0), lengths=(2, 30))
    b = make_instructions(600, torch.Generator().manual_seed(0), lengths=(2, 30))
    assert a == b
    lengths = {e.response_length for e in a}
    assert lengths == set(range(2, 31))
    assert {e.task for e in a} == {"repeat", "count", "reverse"}


def test_batch_masks_prompt_and_padding():
    examples = [make_instruction("count", 4, torch.Generator()), make_instruction("reverse", 9, torch.Generator().manual_seed(1))]
    tok = CharTokenizer(INSTRUCTION_VOCAB)
    batch = instruction_batch(examples, tok)
    x, y = batch.x, batch.y
    masked = mask_prompt(y, batch.prompt_lengths)  # the one prompt-masking mechanism
    assert x.shape == y.shape == batch.response_mask.shape
    for i, e in enumerate(examples):
        # the targets that take a loss once the prompt is masked are exactly the response, stop token included
        assert tok.decode(masked[i][masked[i] != IGNORE_INDEX]) == e.response
        assert torch.equal(masked[i] != IGNORE_INDEX, batch.response_mask[i])
        assert int(batch.response_mask[i].sum()) == e.response_length
        full = e.prompt + e.response
        assert tok.decode(x[i, : len(full) - 1]) == full[:-1]
        # unmasked, every position but the padding predicts the next character
        assert tok.decode(y[i][y[i] != IGNORE_INDEX]) == full[1:]
    assert batch.to("cpu") is batch


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        make_instruction("sort", 5, torch.Generator())
    with pytest.raises(ValueError, match="length"):
        make_instruction("count", 1, torch.Generator())
    with pytest.raises(ValueError, match="lengths"):
        make_instructions(3, torch.Generator(), lengths=(5, 2))
    with pytest.raises(ValueError, match="empty"):
        instruction_batch([])
