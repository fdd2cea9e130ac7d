"""minigpt.losses.linear_cross_entropy: F.linear + F.cross_entropy without the logits.

It must equal the two-step version in value and in all three gradients (1e-10 in float64, 1e-4 relative
in float32) with ignore_index, label smoothing and every reduction, whatever the chunk size; never form
an (N, V) tensor; stay finite at extreme logits; and refuse bad input naming the argument.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from minigpt.losses import IGNORE_INDEX, REDUCTIONS, linear_cross_entropy
from minigpt.losses.fused import default_chunk_size
from minigpt.model import GPT, GPTConfig

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _problem(N, D, V, dtype, bias=True, ignore_every=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g, dtype=dtype) * scale).requires_grad_()
    W = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = IGNORE_INDEX
    return h, W, b, y


def _grads(loss, inputs, upstream):
    return torch.autograd.grad((loss * upstream).sum(), [t for t in inputs if t is not None])


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _compare(h, W, b, y, *, eps=0.0, reduction="mean", chunk_size=None, seed=1):
    ref = F.cross_entropy(F.linear(h, W, b), y, label_smoothing=eps, reduction=reduction)
    out = linear_cross_entropy(h, W, y, bias=b, label_smoothing=eps, reduction=reduction, chunk_size=chunk_size)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=ref.dtype)
    g_ref, g_out = _grads(ref, (h, W, b), upstream), _grads(out, (h, W, b), upstream)
    value_err = ((out - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()
    return max([value_err] + [_max_rel(o, r) for o, r in zip(g_out, g_ref)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_linear_then_cross_entropy(dtype, reduction, eps, bias):
    h, W, b, y = _problem(41, 12, 17, dtype, bias=bias)
    assert _compare(h, W, b, y, eps=eps, reduction=reduction, chunk_size=5) < TOL[dtype]


@pytest.mark.parametrize("chunk_size", [1, 3, 40, 41, 1000])
def test_any_chunk_size_gives_the_same_result(chunk_size):
    h, W, b, y = _problem(41, 6, 9, torch.float64)
    assert _compare(h, W, b, y, eps=0.05, chunk_size=chunk_size) < 1e-10


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 30), D=st.integers(1, 9), V=st.integers(2, 25), eps=st.sampled_from([0.0, 0.2, 0.9]),
       reduction=st.sampled_from(["mean", "sum", "none"]), chunk=st.integers(1, 35), seed=st.integers(0, 10**6))
def test_property_equal_in_float64(N, D, V, eps, reduction, chunk, seed):
    h, W, b, y = _problem(N, D, V, torch.float64, ignore_every=0, seed=seed)
    y[torch.rand(N, generator=torch.Generator().manual_seed(seed)) < 0.3] = IGNORE_INDEX
    y[0] = 0  # at least one kept position, so that the mean is defined
    assert _compare(h, W, b, y, eps=eps, reduction=reduction, chunk_size=chunk) < 1e-10


def test_batched_hidden_and_ignore_index():
    h, W, b, y = _problem(24, 8, 10, torch.float64)
    h3 = h.detach().view(4, 6, 8).requires_grad_()
    y3 = y.view(4, 6)
    out = linear_cross_entropy(h3, W, y3, bias=b, reduction="none", chunk_size=7)
    ref = F.cross_entropy(F.linear(h3, W, b).transpose(1, 2), y3, reduction="none")
    assert out.shape == (4, 6) and torch.allclose(out, ref, atol=1e-12)
    assert (out[y3 == IGNORE_INDEX] == 0).all()
    custom = linear_cross_entropy(h, W, torch.where(y == IGNORE_INDEX, 3, y), bias=b, ignore_index=3)
    assert torch.allclose(custom, F.cross_entropy(F.linear(h, W, b), torch.where(y == IGNORE_INDEX, 3, y),
                                                  ignore_index=3), atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_logits_sized_tensor_is_ever_created(reduction):
    N, D, V, chunk = 256, 16, 300, 32
    h, W, b, y = _problem(N, D, V, torch.float32)
    with _LargestTensor() as seen:
        loss = linear_cross_entropy(h, W, y, bias=b, reduction=reduction, chunk_size=chunk)
        loss.sum().backward()
    assert seen.largest == chunk * V  # one block of logits at a time; the (N, V) logits would be 8x that
    with _LargestTensor() as two_step:
        F.cross_entropy(F.linear(h, W, b), y, reduction=reduction).sum().backward()
    assert two_step.largest == N * V


def test_finite_at_extreme_logits():
    # logits of size about 1e4 in float32: the log-sum-exp must be taken relative to the row maximum
    h, W, b, y = _problem(32, 8, 50, torch.float32, scale=3e3)
    out = linear_cross_entropy(h, W, y, bias=b)
    out.backward()
    assert torch.isfinite(out) and all(torch.isfinite(t.grad).all() for t in (h, W, b))
    with torch.no_grad():
        ref = F.cross_entropy(F.linear(h.double(), W.double(), b.double()), y)
    assert abs(out.item() - ref.item()) / ref.item() < 1e-4


def test_half_precision_accumulates_in_float32():
    h, W, b, y = _problem(40, 16, 30, torch.float32, bias=False)
    ref = F.cross_entropy(F.linear(h, W), y)
    out = linear_cross_entropy(h.detach().bfloat16().requires_grad_(), W.detach().bfloat16(), y)
    assert out.dtype == torch.bfloat16 and abs(out.float().item() - ref.item()) < 0.05 * ref.item()


def test_no_gradient_work_without_grad_mode_and_partial_requires_grad():
    h, W, b, y = _problem(20, 5, 7, torch.float64)
    with torch.no_grad():
        value = linear_cross_entropy(h, W, y, bias=b)
    assert not value.requires_grad
    assert torch.allclose(value, F.cross_entropy(F.linear(h, W, b), y).detach(), atol=1e-12)
    frozen = h.detach()  # only the output layer trains
    linear_cross_entropy(frozen, W, y, bias=b).backward()
    ref_W = W.grad.clone()
    W.grad = None
    F.cross_entropy(F.linear(frozen, W, b), y).backward()
    assert torch.allclose(ref_W, W.grad, atol=1e-12)


def test_a_second_backward_is_refused_not_wrong():
    h, W, b, y = _problem(10, 4, 6, torch.float64)
    loss = linear_cross_entropy(h, W, y, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()


def test_sum_of_no_positions_is_zero():
    h, W, b, _ = _problem(0, 4, 6, torch.float64)
    out = linear_cross_entropy(h, W, torch.zeros(0, dtype=torch.long), bias=b, reduction="sum")
    out.backward()
    assert out.item() == 0 and W.grad.abs().max() == 0


@pytest.mark.parametrize("call, match", [
    (lambda h, W, b, y: linear_cross_entropy(h.long(), W, y), "hidden must be a floating tensor"),
    (lambda h, W, b, y: linear_cross_entropy(h[0], W, y), "hidden must be a floating tensor of shape"),
    (lambda h, W, b, y: linear_cross_entropy(h, W[:, :3], y), r"weight must have shape \(V, 5\)"),
    (lambda h, W, b, y: linear_cross_entropy(h, W.float(), y), "weight must have hidden's dtype"),
    (lambda h, W, b, y: linear_cross_entropy(h, W, y, bias=b[:2]), r"bias must be a \(7,\) tensor"),
    (lambda h, W, b, y: linear_cross_entropy(h, W, y.float()), "target must be an int64 tensor"),
    (lambda h, W, b, y: linear_cross_entropy(h, W, y[:3]), r"target must be .* of shape \(20,\)"),
    (lambda h, W, b, y: linear_cross_entropy(h, W, y + 7), r"outside \[0, 7\)"),
    (lambda h, W, b, y: linear_cross_entropy(h, W, torch.full_like(y, IGNORE_INDEX)), "all ignore_index"),
    (lambda h, W, b, y: linear_cross_entropy(h, W, y, label_smoothing=1.0), "label_smoothing must lie in"),
    (lambda h, W, b, y: linear_cross_entropy(h, W, y, chunk_size=0), "chunk_size must be a positive int"),
    (lambda h, W, b, y: linear_cross_entropy(h, W, y, reduction="batchmean"), "reduction must be one of"),
])
def test_bad_input_names_the_argument(call, match):
    h, W, b, y = _problem(20, 5, 7, torch.float64, ignore_every=0)
    with pytest.raises(ValueError, match=match):
        call(h, W, b, y)


def test_default_chunk_size_bounds_the_block():
    assert default_chunk_size(50257) * 50257 <= 2**23 and default_chunk_size(50257) >= 16
    assert default_chunk_size(10**8) == 16


def _gpt(linear_ce: bool):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16,
                         linear_cross_entropy=linear_ce)).double()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpt_trains_through_it_with_loss_and_gradients_unchanged(reduction):
    plain, fused = _gpt(False), _gpt(True)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50, (3, 16), generator=g)
    y = torch.randint(0, 50, (3, 16), generator=g)
    y[0, :5] = IGNORE_INDEX
    logits, ref = plain(x, y, reduction=reduction)
    none, out = fused(x, y, reduction=reduction)
    assert logits.shape == (3, 16, 50) and none is None and out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-10)
    out.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10), name
    assert fused(x)[0].shape == (3, 16, 50)  # without targets it still returns the logits


def test_gpt_switch_refuses_other_losses():
    from minigpt.losses import softmax_focal_loss

    model = _gpt(True)
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="loss_fn must be F.cross_entropy"):
        model(x, x, loss_fn=softmax_focal_loss)
