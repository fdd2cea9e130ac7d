"""Device and dtype readiness of minigpt.metrics and minigpt.multitask (issue 12).

Three kinds of check:
- on a second device (CUDA, else MPS), every public function gives the CPU's result and keeps its
  result on the inputs' device; skipped where there is none;
- on the CPU, always: the multitask per-step paths run on the ``meta`` device, which fails on a CPU
  tensor mixed in and on any value read back to the host (the two faults that stall or break a GPU
  run); float64 and float32 losses keep their dtype;
- a scan of the two modules' source for tensor factories without ``device=``.
"""

import ast
import copy
import math
import pathlib

import pytest
import torch

from minigpt import metrics
from minigpt import multitask as mt


def _second_device() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return None


DEVICE = _second_device()
needs_device = pytest.mark.skipif(DEVICE is None, reason="no CUDA or MPS device")

# --- inputs, made once on the CPU --------------------------------------------------------------------

_g = torch.Generator().manual_seed(0)
N, C = 400, 5
LOGITS = torch.randn(N, C, generator=_g) * 2
PROBS = torch.softmax(LOGITS, 1)
LABELS = torch.randint(0, C, (N,), generator=_g)
BINARY = (torch.rand(N, generator=_g) < 0.2).long()
BINARY[0] = 1
SCORE = torch.round(torch.rand(N, generator=_g) * 20) / 20 + 0.3 * BINARY  # ties on purpose
Y = torch.randn(N, generator=_g)
QUANTILES = torch.sort(torch.randn(N, 3, generator=_g), dim=1).values
QUANTILES[::7] = QUANTILES[::7].flip(1)  # some rows cross
MASK_P = (torch.rand(8, 6, 6, generator=_g) < 0.3).float()
MASK_T = (torch.rand(8, 6, 6, generator=_g) < 0.3).float()
MASK_T[0], MASK_P[0] = 0, 0  # both empty: scores 1
VIEWS = torch.randn(30, 8, generator=_g)
VIEWS2 = VIEWS + 0.8 * torch.randn(30, 8, generator=_g)
LOSSES = torch.tensor([0.7, 2.5, 0.1])
GRADS = [torch.randn(50, generator=_g) for _ in range(3)]
SHARED = torch.nn.Linear(6, 6, bias=False)
HEADS = torch.nn.Linear(6, 2)
X, TARGETS = torch.randn(32, 6, generator=_g), torch.randn(32, 2, generator=_g) * torch.tensor([1.0, 10.0])


def _history_weights(cls, device):
    w = cls(3, window=4)
    for t in range(6):
        w.update(LOSSES.to(device) * (1 + 0.1 * t * torch.arange(3, device=device)))
    return w(LOSSES.to(device)), w.weights()


def _uncertainty(device, move_module):
    uw = mt.UncertaintyWeighting(["regression", "classification", "regression"])
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.1, -0.3, 0.5]))
    if move_module:
        uw = uw.to(device)
    total = uw(LOSSES.to(device))
    (grad,) = torch.autograd.grad(total, uw.log_vars)
    return total, grad, uw.weights()


def _dwa(device):
    dwa = mt.DynamicWeightAverage(3)
    first = dwa(LOSSES.to(device))
    dwa.update(LOSSES.to(device))
    dwa.update(LOSSES.to(device) * torch.tensor([0.5, 0.9, 1.1], device=device))
    return first, dwa(LOSSES.to(device)), dwa.weights()


def _gradnorm(device, steps=5):
    """Five GradNorm steps on a two-task linear model; the module is not moved by hand."""
    shared, heads = copy.deepcopy(SHARED).to(device), copy.deepcopy(HEADS).to(device)
    x, y = X.to(device), TARGETS.to(device)
    gn = mt.GradNorm(2, alpha=1.0, lr=0.05)
    for _ in range(steps):
        out = heads(shared(x))
        losses = [((out[:, k] - y[:, k]) ** 2).mean() for k in range(2)]
        total = gn(losses, shared.weight)
    return total, gn.weights()


def _difficulty(device):
    d = mt.DifficultyAdaptiveWeights(temperature=0.5)
    return d(list(LOSSES.to(device))), d.weights()


# name -> function of a device, returning a float, a tensor, a tuple of them or a ReliabilityDiagram
CASES = {
    "accuracy labels": lambda d: metrics.accuracy(LOGITS.argmax(1).to(d), LABELS.to(d)),
    "accuracy scores": lambda d: metrics.accuracy(LOGITS.to(d), LABELS.to(d)),
    "f1_score binary": lambda d: metrics.f1_score((SCORE > 0.5).long().to(d), BINARY.to(d)),
    "f1_score macro": lambda d: metrics.f1_score(LOGITS.argmax(1).to(d), LABELS.to(d), average="macro"),
    "pr_auc": lambda d: metrics.pr_auc(SCORE.to(d), BINARY.to(d)),
    "reliability_diagram": lambda d: metrics.reliability_diagram(PROBS.to(d), LABELS.to(d), n_bins=10),
    "expected_calibration_error": lambda d: metrics.expected_calibration_error(PROBS.to(d), LABELS.to(d)),
    "interval_coverage": lambda d: metrics.interval_coverage(QUANTILES[:, 0].to(d), QUANTILES[:, 2].to(d), Y.to(d)),
    "quantile_crossing_rate": lambda d: metrics.quantile_crossing_rate(QUANTILES.to(d)),
    "dice_score": lambda d: metrics.dice_score(MASK_P.to(d), MASK_T.to(d)),
    "retrieval_accuracy": lambda d: metrics.retrieval_accuracy(VIEWS.to(d), VIEWS2.to(d)),
    "FixedWeights": lambda d: (mt.FixedWeights([1.0, 0.2, 3.0])(LOSSES.to(d)),),
    "FixedWeights, list of 0-d losses": lambda d: (mt.FixedWeights([1.0, 0.2, 3.0])(list(LOSSES.to(d))),),
    "UncertaintyWeighting, moved": lambda d: _uncertainty(d, move_module=True),
    "UncertaintyWeighting, left on the CPU": lambda d: _uncertainty(d, move_module=False),
    "DynamicWeightAverage": _dwa,
    "GradNorm": _gradnorm,
    "gradient_cosine": lambda d: mt.gradient_cosine(GRADS[0].to(d), GRADS[1].to(d)),
    "pcgrad": lambda d: mt.pcgrad([g.to(d) for g in GRADS], generator=torch.Generator().manual_seed(3)),
    "DifficultyAdaptiveWeights": _difficulty,
    "PerformanceBasedWeights": lambda d: _history_weights(mt.PerformanceBasedWeights, d),
    "InverseStdWeights": lambda d: _history_weights(mt.InverseStdWeights, d),
    "gradient_balance_weights": lambda d: mt.gradient_balance_weights(
        torch.stack([g.norm() for g in GRADS]).to(d)),
    "gradient_balance_weights, list of 0-d norms": lambda d: mt.gradient_balance_weights(
        [g.to(d).norm() for g in GRADS]),
}


def _assert_same(on_device, on_cpu, device):
    if isinstance(on_cpu, tuple):
        assert len(on_device) == len(on_cpu)
        for a, b in zip(on_device, on_cpu):
            _assert_same(a, b, device)
    elif isinstance(on_cpu, torch.Tensor):
        assert on_device.device.type == device.type, "the result left the inputs' device"
        assert on_device.dtype == on_cpu.dtype
        torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=1e-4, atol=1e-6)
    elif isinstance(on_cpu, metrics.ReliabilityDiagram):
        assert on_device.count == on_cpu.count and on_device.edges == on_cpu.edges
        for field in ("confidence", "accuracy"):
            torch.testing.assert_close(torch.tensor(getattr(on_device, field)), torch.tensor(getattr(on_cpu, field)),
                                       rtol=1e-5, atol=1e-7, equal_nan=True)
    else:
        assert isinstance(on_device, float) and on_device == pytest.approx(on_cpu, rel=1e-5, abs=1e-7)


@needs_device
@pytest.mark.parametrize("name", list(CASES))
def test_second_device_matches_cpu(name):
    _assert_same(CASES[name](DEVICE), CASES[name](torch.device("cpu")), DEVICE)


@pytest.mark.parametrize("name", list(CASES))
def test_cases_run_on_the_cpu(name):
    """The cases themselves work, so that the first GPU run tests the code, not the test."""
    cpu = torch.device("cpu")
    _assert_same(CASES[name](cpu), CASES[name](cpu), cpu)


@needs_device
def test_pcgrad_takes_a_generator_on_the_device():
    grads = [GRADS[0].to(DEVICE), -GRADS[0].to(DEVICE) + GRADS[1].to(DEVICE)]  # two tasks: order is moot
    out = mt.pcgrad(grads, generator=torch.Generator(device=DEVICE).manual_seed(0))
    torch.testing.assert_close(out.cpu(), mt.pcgrad([g.cpu() for g in grads]), rtol=1e-5, atol=1e-6)


# --- on the CPU, always ------------------------------------------------------------------------------

META = torch.device("meta")

# The per-step multitask paths. Not here: the metrics and gradient_balance_weights, which validate
# their inputs or return Python floats, so read values back by design (outside the training step).
META_CASES = {
    "FixedWeights": lambda: CASES["FixedWeights"](META),
    "FixedWeights, list of 0-d losses": lambda: CASES["FixedWeights, list of 0-d losses"](META),
    "UncertaintyWeighting, moved": lambda: mt.UncertaintyWeighting(["regression", "classification"]).to(META)(
        torch.ones(2, device=META)),
    "UncertaintyWeighting, left on the CPU": lambda: mt.UncertaintyWeighting(["regression", "classification"])(
        torch.ones(2, device=META)),
    "DynamicWeightAverage": lambda: _dwa(META),
    "GradNorm": lambda: _gradnorm(META, steps=2),
    "pcgrad": lambda: mt.pcgrad([torch.ones(50, device=META) for _ in range(3)]),
    "DifficultyAdaptiveWeights": lambda: _difficulty(META),
    "PerformanceBasedWeights": lambda: _history_weights(mt.PerformanceBasedWeights, META),
    "InverseStdWeights": lambda: _history_weights(mt.InverseStdWeights, META),
}


@pytest.mark.parametrize("name", list(META_CASES))
def test_multitask_step_runs_on_meta_device(name):
    """A CPU tensor mixed with a meta one raises, and so does reading a meta value back to the host
    (``.item()``, ``if tensor:``): what would break, or stall, the step on a GPU."""
    result = META_CASES[name]()
    for t in result if isinstance(result, tuple) else (result,):
        assert t.device == META


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multitask_keeps_the_losses_dtype(dtype):
    L = LOSSES.to(dtype)
    uw = mt.UncertaintyWeighting(["regression", "classification", "regression"])
    dwa = mt.DynamicWeightAverage(3)
    dwa.update(L), dwa.update(L * 0.5)
    perf, inv = mt.PerformanceBasedWeights(3, window=2), mt.InverseStdWeights(3, window=2)
    for w in (perf, inv):
        w.update(L), w.update(L * 0.5)
    totals = {
        "FixedWeights": mt.FixedWeights([1.0, 0.2, 3.0])(L),
        "UncertaintyWeighting": uw(L),
        "DynamicWeightAverage": dwa(L),
        "DifficultyAdaptiveWeights": mt.DifficultyAdaptiveWeights()(L),
        "PerformanceBasedWeights": perf(L),
        "InverseStdWeights": inv(L),
        "pcgrad": mt.pcgrad([g.to(dtype) for g in GRADS]),
    }
    assert {name: t.dtype for name, t in totals.items()} == {name: dtype for name in totals}


def test_gradnorm_keeps_float64():
    shared = torch.nn.Linear(3, 3, bias=False).double()
    h = shared(torch.randn(4, 3, dtype=torch.float64))
    total = mt.GradNorm(2)([h[:, 0].pow(2).mean(), h[:, 1].pow(2).mean()], shared.weight)
    assert total.dtype == torch.float64 and math.isfinite(total.item())


def test_metrics_agree_across_input_dtypes():
    """float32 and float64 inputs give the same metric: the internal float64 is not lost or mixed."""
    for dtype in (torch.float32, torch.float64):
        p = PROBS.to(dtype)
        assert metrics.expected_calibration_error(p, LABELS) == pytest.approx(
            metrics.expected_calibration_error(PROBS.double(), LABELS), abs=1e-6)
        assert metrics.pr_auc(SCORE.to(dtype), BINARY) == pytest.approx(
            metrics.pr_auc(SCORE.double(), BINARY), rel=1e-6)
        assert metrics.dice_score(MASK_P.to(dtype), MASK_T.to(dtype)).dtype == torch.float64


# --- source scan -------------------------------------------------------------------------------------

FACTORIES = {"zeros", "ones", "full", "empty", "eye", "arange", "linspace", "tensor", "as_tensor",
             "randperm", "rand", "randn", "randint"}

# (file, call as written) -> why it may build on the default device
ALLOWED = {
    ("multitask.py", "torch.zeros(len(types))"): "parameter built in __init__; Module.to(device) moves it",
    ("multitask.py", "torch.ones(len(types))"): "buffer built in __init__; Module.to(device) moves it",
    ("multitask.py", 'torch.tensor([0.5 if t == "regression" else 1.0 for t in types])'):
        "buffer built in __init__; Module.to(device) moves it",
    ("multitask.py", "torch.full((len(types),), 0.5)"): "buffer built in __init__; Module.to(device) moves it",
    ("multitask.py", "torch.as_tensor(weights, dtype=torch.float32)"):
        "the caller's weights; FixedWeights moves them to the losses' device on the first call",
    ("multitask.py", "torch.ones(n_tasks)"): "GradNorm's parameter; moved to the losses' device on the first call",
    ("multitask.py", "torch.ones(self.n_tasks)"):
        "equal weights before any history; __call__ moves them to the losses' device once",
    ("multitask.py", "torch.full((self.n_tasks,), 1.0 / self.n_tasks)"):
        "equal weights before any history; __call__ moves them to the losses' device once",
}


def _calls_without_device(path: pathlib.Path):
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            yield node.lineno, ast.get_source_segment(source, node)


def _numpy_without_cpu(path: pathlib.Path):
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy":
            receiver = node.func.value
            if not (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute)
                    and receiver.func.attr == "cpu"):
                yield node.lineno, ast.get_source_segment(source, node)


@pytest.mark.parametrize("module", [metrics, mt], ids=["metrics", "multitask"])
def test_no_tensor_factory_without_device(module):
    """A factory without ``device=`` builds on the CPU; combined with a CUDA input it fails or copies each
    call. Use ``torch.*_like``, ``t.new_*`` or ``device=``, or list the call in ALLOWED with a reason."""
    path = pathlib.Path(module.__file__)
    found = [(line, call) for line, call in _calls_without_device(path) if (path.name, call) not in ALLOWED]
    found += list(_numpy_without_cpu(path))
    assert not found, f"{path.name}: " + "; ".join(f"line {line}: {call}" for line, call in found)


def test_allowed_exceptions_still_exist():
    """An ALLOWED entry whose call has gone should go too, or it would excuse a new call by accident."""
    present = {(p.name, call) for m in (metrics, mt) for p in [pathlib.Path(m.__file__)]
               for _, call in _calls_without_device(p)}
    assert set(ALLOWED) <= present, set(ALLOWED) - present
