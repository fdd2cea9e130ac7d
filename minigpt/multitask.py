"""Multi-task loss weighting: combine K task losses into one, with weights that are fixed, learned, or
updated from the losses' history or the tasks' gradients.

Every weighting has ``weights()`` -> (K,) tensor and is called as ``weighting(losses)`` with a sequence
of K scalar losses, returning the total to backpropagate. History-based schemes also need ``update``.
The source notes' schemes are included so that the book can measure them next to the published ones.

The losses may live on any device; a weighting's own tensors move to the losses' device on the first
call and stay there, and the per-step calls (``weighting(losses)``, ``update``, ``pcgrad``) read no
value back to the host, so they do not stall a GPU.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn as nn

from .metrics import exact_float


def _stack(losses, name: str = "losses") -> torch.Tensor:
    """K scalar losses (a (K,) tensor, or a sequence of 0-d tensors and numbers) as one (K,) tensor, on
    the device of the first tensor among them (numbers alone give a CPU tensor)."""
    if isinstance(losses, torch.Tensor):
        t = losses
    else:
        items = list(losses)
        if not items:
            raise ValueError(f"{name} must be K scalar values, got none")
        device = next((l.device for l in items if isinstance(l, torch.Tensor)), None)
        t = torch.stack([torch.as_tensor(l, device=device) for l in items])
    if t.ndim != 1 or len(t) == 0:
        raise ValueError(f"{name} must be K scalar values, got shape {tuple(t.shape)}")
    return t


class FixedWeights:
    """``sum_i w_i L_i`` with constant weights (K,)."""

    def __init__(self, weights):
        self._w = torch.as_tensor(weights, dtype=torch.float32)
        if self._w.ndim != 1 or bool((self._w < 0).any()):
            raise ValueError("weights must be a 1-D sequence of non-negative numbers")

    def weights(self) -> torch.Tensor:
        """(K,) float32 weights, on the device of the last losses seen."""
        return self._w.clone()

    def __call__(self, losses) -> torch.Tensor:
        """K scalar losses -> 0-d total, in the losses' dtype and on their device."""
        L = _stack(losses)
        if len(L) != len(self._w):
            raise ValueError(f"losses must hold {len(self._w)} task losses, got {len(L)}")
        self._w = self._w.to(L.device)  # copied once, not every step
        return (self._w.to(L.dtype) * L).sum()


class UncertaintyWeighting(nn.Module):
    """Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla 2018), with learned ``s_i = log sigma_i^2``.

    ``form="exact"``: the paper's terms, ``0.5 exp(-s) L + 0.5 s`` for a regression task and
    ``exp(-s) L + 0.5 s`` for a classification task. ``form="common"``: ``exp(-s) L + s`` for every task,
    the form most code uses: twice the regression term. For a regression task both put the optimum at
    ``s = log L``, i.e. weight ``1 / L`` on the task's loss: a task whose loss goes to zero gets an
    exploding weight, and the total goes negative once ``L < 1/e`` (expected, not a bug).

    A module: move it with ``.to(device)`` before building its optimizer, as for a model. (Left on the
    CPU it still works with losses on another device, at the cost of a copy each step.)
    """

    def __init__(self, task_types, form: str = "exact"):
        super().__init__()
        types = list(task_types)
        if not types or any(t not in ("regression", "classification") for t in types):
            raise ValueError("task_types must list 'regression' or 'classification' for each task")
        if form not in ("exact", "common"):
            raise ValueError(f"form must be 'exact' or 'common', got {form!r}")
        self.task_types, self.form = types, form
        self.log_vars = nn.Parameter(torch.zeros(len(types)))  # (K,) s_i
        # (K,) coefficients of exp(-s) L and of s; buffers, so that .to(device) moves them with log_vars
        if form == "common":
            loss_coef, s_coef = torch.ones(len(types)), torch.ones(len(types))
        else:
            loss_coef = torch.tensor([0.5 if t == "regression" else 1.0 for t in types])
            s_coef = torch.full((len(types),), 0.5)
        self.register_buffer("loss_coef", loss_coef, persistent=False)
        self.register_buffer("s_coef", s_coef, persistent=False)

    def weights(self) -> torch.Tensor:
        """(K,) effective weights on the losses, ``loss_coef * exp(-s)``, detached."""
        return (self.loss_coef * torch.exp(-self.log_vars)).detach()

    def forward(self, losses) -> torch.Tensor:
        """K scalar losses -> 0-d total, in the losses' dtype and on their device."""
        L = _stack(losses)
        s = self.log_vars.to(L)  # a no-op once the module is on the losses' device
        return (self.loss_coef.to(L) * torch.exp(-s) * L + self.s_coef.to(L) * s).sum()


class DynamicWeightAverage:
    """DWA (Liu, Johns and Davison 2019): ``lambda_k = K softmax_k(r_k / T)`` with
    ``r_k = L_k(t-1) / L_k(t-2)`` from epoch-average losses; weights are 1 for the first two epochs.
    Ratios make it independent of each loss's units (a softmax over raw losses is not)."""

    def __init__(self, n_tasks: int, temperature: float = 2.0):
        if n_tasks < 1 or not temperature > 0:
            raise ValueError("n_tasks must be >= 1 and temperature > 0")
        self.n_tasks, self.temperature = n_tasks, temperature
        self.history: deque = deque(maxlen=2)  # the last two (K,) epoch-average losses
        self._w: torch.Tensor | None = None  # weights() on the losses' device, until the next update

    def update(self, epoch_losses) -> None:
        """Record the epoch-average loss of each task, K values (call once per epoch)."""
        L = exact_float(_stack(epoch_losses, "epoch_losses").detach())
        if len(L) != self.n_tasks:
            raise ValueError(f"epoch_losses must hold {self.n_tasks} values, got {len(L)}")
        self.history.append(L)
        self._w = None

    def weights(self) -> torch.Tensor:
        """(K,) float32 weights, summing to K, on the device of the recorded losses."""
        if len(self.history) < 2:
            return torch.ones(self.n_tasks, device=self.history[0].device if self.history else None)
        ratio = self.history[1] / self.history[0]
        return (self.n_tasks * torch.softmax(ratio / self.temperature, dim=0)).float()

    def __call__(self, losses) -> torch.Tensor:
        """K scalar losses -> 0-d total, in the losses' dtype and on their device."""
        L = _stack(losses)
        if len(self.history) < 2:
            return L.sum()  # every weight is 1
        if self._w is None or self._w.device != L.device:
            self._w = self.weights().to(L.device)  # once per epoch, not every step
        return (self._w.to(L.dtype) * L).sum()


class GradNorm(nn.Module):
    """GradNorm (Chen et al. 2018): learned weights ``w_i`` that equalise how fast tasks train.

    At each step, with ``G_i = ||grad_W (w_i L_i)||`` at the last shared layer's weight W,
    ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` and target ``mean(G) r_i^alpha`` (held constant), the
    weights take a gradient step on ``sum_i |G_i - target_i|``; then they are renormalised to sum to K.

    Usage per training step: ``total = gradnorm(losses, shared_weight)``, ``total.backward()`` for the
    model, ``optimizer.step()``. The weights are updated inside the call, by their own optimizer; on the
    first call they move to the losses' device (their optimizer has no state yet).
    """

    def __init__(self, n_tasks: int, alpha: float = 1.5, lr: float = 0.025):
        super().__init__()
        if n_tasks < 2:
            raise ValueError("GradNorm needs at least 2 tasks")
        self.alpha = alpha
        self.w = nn.Parameter(torch.ones(n_tasks))
        self.initial_losses: torch.Tensor | None = None
        self._opt = torch.optim.Adam([self.w], lr=lr)

    def weights(self) -> torch.Tensor:
        """(K,) current weights, summing to K."""
        return self.w.detach().clone()

    def forward(self, losses, shared_weight: torch.Tensor) -> torch.Tensor:
        """K scalar losses and the last shared layer's weight W (any shape, in the losses' graph) -> 0-d
        total ``sum_i w_i L_i`` with the weights updated this step, detached from them."""
        L = _stack(losses)
        if self.w.device != L.device:
            if self._opt.state:
                raise ValueError(f"GradNorm's weights are on {self.w.device} but the losses on {L.device}; "
                                 "move it with .to(device) before the first call, not after")
            self.to(L.device)  # moves w in place: the optimizer still holds it
        if self.initial_losses is None:
            self.initial_losses = L.detach().clone()
        grads = [torch.autograd.grad(self.w[i] * L[i], shared_weight, retain_graph=True, create_graph=True)[0]
                 for i in range(len(L))]
        G = torch.stack([g.norm() for g in grads])
        ratio = L.detach() / self.initial_losses
        r = ratio / ratio.mean()
        target = (G.mean() * r ** self.alpha).detach()
        gradnorm_loss = (G - target).abs().sum()
        self._opt.zero_grad()
        (w_grad,) = torch.autograd.grad(gradnorm_loss, self.w, retain_graph=True)
        self.w.grad = w_grad
        self._opt.step()
        with torch.no_grad():  # renormalise: sum w = K, and keep weights positive
            self.w.clamp_(min=1e-6)
            self.w.mul_(len(L) / self.w.sum())
        return (self.w.detach() * L).sum()


class RandomLossWeighting:
    """Random loss weighting, RLW (Lin et al. 2021): weights ``softmax(z)`` with ``z ~ N(0, I)`` drawn
    afresh at every call, so they sum to 1 and every task is, on average, weighted equally.

    Lin et al. show that this costs nothing per step beyond drawing K numbers and matches many learned
    schemes; it is the baseline a weighting method should beat.

    Args:
        n_tasks: K >= 1.
        generator: a CPU generator for the draws (reproducible runs); the global one if None.
    """

    def __init__(self, n_tasks: int, generator: torch.Generator | None = None):
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
        self.n_tasks, self.generator = n_tasks, generator
        self._w: torch.Tensor | None = None

    def weights(self) -> torch.Tensor:
        """(K,) float32 weights of the last call, summing to 1, on the device of its losses."""
        if self._w is None:
            raise ValueError("no weights drawn yet: call the weighting with the task losses first")
        return self._w.clone()

    def __call__(self, losses) -> torch.Tensor:
        """K scalar losses -> 0-d total ``sum_i softmax(z)_i L_i`` with new weights, in the losses' dtype and
        on their device (the draw is on the CPU, then copied: K numbers, no read-back)."""
        L = _stack(losses)
        if len(L) != self.n_tasks:
            raise ValueError(f"losses must hold {self.n_tasks} task losses, got {len(L)}")
        z = torch.randn(self.n_tasks, generator=self.generator, device="cpu")  # the generator is a CPU one
        self._w = torch.softmax(z, dim=0).to(L.device)
        return (self._w.to(L.dtype) * L).sum()


def gradient_cosine(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """Cosine between two task gradients of D elements each (any shape, flattened): negative means the
    tasks pull apart."""
    return torch.nn.functional.cosine_similarity(exact_float(g1.flatten()), exact_float(g2.flatten()), dim=0).item()


def pcgrad(grads, generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad (Yu et al. 2020): for each task gradient g_i, for each other task j in random order, if
    ``g_i . g_j < 0`` remove g_i's component along the *original* g_j; return the sum of the results.

    Args:
        grads: K flattened task gradients of equal shape (D,).
        generator: draws the orders; a CPU one, or one on the gradients' device.

    Returns:
        (D,) combined gradient, in the gradients' dtype and on their device.
    """
    originals = [g.detach().flatten() for g in grads]
    if len(originals) < 2 or len({g.shape for g in originals}) != 1:
        raise ValueError("grads must hold at least 2 gradients of the same size")
    K = len(originals)
    order_device = generator.device if generator is not None else "cpu"
    projected = []
    for i in range(K):
        g = originals[i].clone()
        others = [j for j in torch.randperm(K, generator=generator, device=order_device).tolist() if j != i]
        for j in others:
            # clamp, not ``if dot < 0``: a branch would read dot back to the host for every pair
            dot = torch.dot(g, originals[j]).clamp(max=0)
            g = g - dot / originals[j].pow(2).sum().clamp(min=1e-30) * originals[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


# --- the source notes' schemes, kept to be measured ------------------------------------------------


class DifficultyAdaptiveWeights:
    """The notes' "difficulty adaptive" weights: ``softmax(L / tau)`` of the current losses (summing to 1).
    A softmax over raw losses depends on each loss's units: rescaling one task's loss changes every
    weight, unlike DWA's ratios."""

    def __init__(self, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self._w: torch.Tensor | None = None

    def weights(self) -> torch.Tensor:
        """(K,) weights of the last call, summing to 1, in the losses' dtype and on their device."""
        if self._w is None:
            raise ValueError("no losses seen yet: call the weighting with the task losses first")
        return self._w.clone()

    def __call__(self, losses) -> torch.Tensor:
        """K scalar losses -> 0-d total, in the losses' dtype and on their device."""
        L = _stack(losses)
        self._w = torch.softmax(L.detach() / self.temperature, dim=0)
        return (self._w * L).sum()


class _HistoryWeights:
    """Weights computed from each task's last ``window`` losses; equal until the history is long enough.
    The history stays on the losses' device: ``update`` reads nothing back to the host."""

    def __init__(self, n_tasks: int, window: int = 10):
        if n_tasks < 1 or window < 2:
            raise ValueError("n_tasks must be >= 1 and window >= 2")
        self.n_tasks, self.window = n_tasks, window
        self.history: deque = deque(maxlen=window)  # the last ``window`` (K,) losses, oldest first
        self._w = self._equal()

    def _equal(self) -> torch.Tensor:
        raise NotImplementedError

    def _from_history(self, y: torch.Tensor) -> torch.Tensor:
        """(window, K) losses, oldest first -> (K,) float32 weights."""
        raise NotImplementedError

    def update(self, losses) -> None:
        """Record K losses (call once per step)."""
        L = exact_float(_stack(losses).detach())
        if len(L) != self.n_tasks:
            raise ValueError(f"losses must hold {self.n_tasks} values, got {len(L)}")
        self.history.append(L)
        if len(self.history) >= self.window:
            self._w = self._from_history(torch.stack(list(self.history)))

    def weights(self) -> torch.Tensor:
        """(K,) float32 weights, on the device of the recorded losses."""
        return self._w.clone()

    def __call__(self, losses) -> torch.Tensor:
        """K scalar losses -> 0-d total, in the losses' dtype and on their device."""
        L = _stack(losses)
        self._w = self._w.to(L.device)  # a no-op once the weights are on the losses' device
        return (self._w.to(L.dtype) * L).sum()


class PerformanceBasedWeights(_HistoryWeights):
    """The notes' "performance based" weights: a task's learning speed is minus the slope of a line through
    its last ``window`` losses (0 if rising); weights are ``1 / (speed + 1e-6)``, normalised to sum to K.
    A task that has stopped improving, converged or stuck, gets about a million times the weight of one
    that is still learning."""

    def _equal(self) -> torch.Tensor:
        return torch.ones(self.n_tasks)

    def _from_history(self, y: torch.Tensor) -> torch.Tensor:
        x = torch.arange(self.window, dtype=y.dtype, device=y.device)
        x = x - x.mean()
        slope = (x[:, None] * (y - y.mean(0))).sum(0) / (x * x).sum()  # (K,) least-squares slopes
        speed = (-slope).clamp(min=0)
        inverse = 1.0 / (speed + 1e-6)
        return (self.n_tasks * inverse / inverse.sum()).float()


class InverseStdWeights(_HistoryWeights):
    """The notes' ``1 / (1 + std)`` weights over each task's last ``window`` losses, normalised to sum to
    1. The standard deviation carries the loss's units, so the weights depend on how each loss is scaled."""

    def _equal(self) -> torch.Tensor:
        return torch.full((self.n_tasks,), 1.0 / self.n_tasks)

    def _from_history(self, y: torch.Tensor) -> torch.Tensor:
        w = 1.0 / (1.0 + y.std(dim=0, unbiased=False))
        return (w / w.sum()).float()


def gradient_balance_weights(grad_norms) -> torch.Tensor:
    """The notes' "gradient balance" weights: ``mean(G) / G_i``, normalised to sum to K, from the norms of
    each task's gradient; tasks with small gradients get large weights. ``grad_norms``: K norms (a (K,)
    tensor or a sequence); returns (K,) float32 weights on their device."""
    G = exact_float(_stack(grad_norms, "grad_norms"))
    if bool((G < 0).any() | ~(G > 0).any()):  # one read-back for both checks
        raise ValueError("grad_norms must be K non-negative norms, not all zero")
    w = G.mean() / (G + 1e-8)
    return (len(G) * w / w.sum()).float()


__all__ = [
    "DifficultyAdaptiveWeights", "DynamicWeightAverage", "FixedWeights", "GradNorm", "InverseStdWeights",
    "PerformanceBasedWeights", "RandomLossWeighting", "UncertaintyWeighting", "gradient_balance_weights", "gradient_cosine", "pcgrad",
]
