"""Built-in embedding converters: maps g(x) = W·x + b from source to destination LLM input embeddings.

Each is a `converter` component; `fit(src [P, Ds], dst [P, Dd], seed=...)` returns nn.Linear(Ds, Dd).
Fits run in fp32 (gradient) or fp64 (closed form) whatever the embeddings' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from vpgtrans.config import help_field
from vpgtrans.errors import ConfigError, DataError
from vpgtrans.interfaces import Converter
from vpgtrans.registry import Component


def _check_pairs(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.ndim != 2 or dst.ndim != 2 or src.shape[0] != dst.shape[0]:
        raise DataError(f"converter needs matching [pairs, dim] matrices, got {tuple(src.shape)} and "
                        f"{tuple(dst.shape)}", "pass the embeddings of paired tokens, one row per pair")
    if src.shape[0] < 2:
        raise DataError(f"converter got {src.shape[0]} token pair(s)", "pair more tokens (see --pairing)")
    if not (torch.isfinite(src).all() and torch.isfinite(dst).all()):
        raise DataError("converter input embeddings contain NaN or inf", "check the LLM checkpoints")


def _linear_from(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """nn.Linear computing x @ weight + bias, for weight [Ds, Dd] (row-vector convention)."""
    ds, dd = weight.shape
    layer = nn.Linear(ds, dd)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)).float())
        layer.bias.copy_(torch.from_numpy(bias).float())
    return layer


def _centred(src: torch.Tensor, dst: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x = src.detach().double().cpu().numpy()
    y = dst.detach().double().cpu().numpy()
    mx, my = x.mean(0), y.mean(0)
    return x - mx, y - my, mx, my


# ---------------------------------------------------------------------------------------------- linear-cosine
@dataclass
class LinearCosineConfig:
    """The paper's converter: a linear map trained to maximise cosine similarity."""

    optimizer: Literal["sgd", "adam"] = help_field(
        "sgd", help="sgd = the official code (plain SGD, large LR); adam is less sensitive to the LR")
    lr: float | None = help_field(None, help="learning rate; default 5.0 for sgd (official code), 1e-2 for adam")
    epochs: int = help_field(5, help="passes over the token pairs (official code: 5-8)")
    batch_size: int = help_field(4096, help="token pairs per step (official code: 4096 captions)")
    min_steps: int = help_field(
        500, help="train at least this many steps: a few thousand pairs in batches of 4096 would "
                  "otherwise give only a handful of updates")


class LinearCosineConverter(Converter):
    """g(x) = W·x + b trained on mean(1 − cos(g(src), dst)) in fp32."""

    def __init__(self, config: LinearCosineConfig):
        for name in ("epochs", "batch_size"):
            if getattr(config, name) < 1:
                raise ConfigError(f"converter linear-cosine: {name} must be ≥ 1", f"set {name} to a positive value")
        self.config = config

    def fit(self, src: torch.Tensor, dst: torch.Tensor, *, seed: int = 0) -> nn.Linear:
        """Train the map with the configured optimizer; deterministic for a given seed."""
        _check_pairs(src, dst)
        cfg = self.config
        x, y = src.detach().float(), dst.detach().float().to(src.device)
        # Train on inputs rescaled to unit RMS and fold the factor back into W afterwards: the same
        # map, but SGD's step size no longer depends on the LLM's embedding scale (OPT's are ~0.05,
        # which makes the official lr 5.0 crawl).
        rms = x.pow(2).mean().sqrt().clamp_min(1e-12)
        x = x / rms
        lr = cfg.lr if cfg.lr is not None else (5.0 if cfg.optimizer == "sgd" else 1e-2)
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            layer = nn.Linear(x.shape[1], y.shape[1], device=x.device)
        opt = (torch.optim.SGD(layer.parameters(), lr=lr) if cfg.optimizer == "sgd"
               else torch.optim.Adam(layer.parameters(), lr=lr))
        n = x.shape[0]
        batch = min(cfg.batch_size, n)
        steps = max(cfg.epochs * math.ceil(n / batch), cfg.min_steps)
        # Small CPU steps (the synthetic world's LLMs) spend longer handing work between threads than
        # computing: on a busy 2-core machine one thread was 50x faster for a 2700x64x64 step.
        small = x.device.type == "cpu" and batch * x.shape[1] * y.shape[1] < 2 ** 28
        threads = torch.get_num_threads()
        if small:
            torch.set_num_threads(1)
        try:
            self._train(layer, opt, x, y, batch, steps, gen)
        finally:
            torch.set_num_threads(threads)
        if not all(torch.isfinite(p).all() for p in layer.parameters()):
            raise DataError(f"converter linear-cosine diverged (lr {lr})", "lower lr or use optimizer=adam")
        with torch.no_grad():
            layer.weight.div_(rms)
        return layer

    @staticmethod
    def _train(layer: nn.Linear, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, batch: int,
               steps: int, gen: torch.Generator) -> None:
        n, step = x.shape[0], 0
        while step < steps:
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch):
                idx = order[start:start + batch].to(x.device)
                loss = (1 - F.cosine_similarity(layer(x[idx]), y[idx], dim=-1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step >= steps:
                    break


# ---------------------------------------------------------------------------------------------- lstsq
@dataclass
class LstsqConfig:
    """Closed-form least squares."""

    ridge: float = help_field(0.0, help="L2 penalty λ on W (objective ‖XW − Y‖² + λ‖W‖²; bias unpenalised); "
                                        "0 = plain least squares")


class LstsqConverter(Converter):
    """argmin ‖X·W + b − Y‖² (+ λ‖W‖²) in closed form, via scipy."""

    def __init__(self, config: LstsqConfig):
        if config.ridge < 0:
            raise ConfigError("converter lstsq: ridge must be ≥ 0", "set ridge to 0 or a positive value")
        self.config = config

    def fit(self, src: torch.Tensor, dst: torch.Tensor, *, seed: int = 0) -> nn.Linear:
        """Solve on centred data, so that the bias is the difference of means and is never penalised."""
        _check_pairs(src, dst)
        xc, yc, mx, my = _centred(src, dst)
        if self.config.ridge > 0:
            gram = xc.T @ xc + self.config.ridge * np.eye(xc.shape[1])
            w = scipy.linalg.solve(gram, xc.T @ yc, assume_a="pos")
        else:
            w = scipy.linalg.lstsq(xc, yc)[0]
        return _linear_from(w, my - mx @ w)


# ---------------------------------------------------------------------------------------------- procrustes
@dataclass
class ProcrustesConfig:
    """Orthogonal (or semi-orthogonal) map with a global scale and a bias."""

    scale: bool = help_field(True, help="fit one global scale factor (cosine does not need it; MSE does)")
    iterations: int = help_field(100, help="refinement steps when the source is wider than the destination "
                                           "(no closed form there); 0 = the closed-form start only")


class ProcrustesConverter(Converter):
    """g(x) = s·Rᵀx + b with R orthogonal (equal widths) or semi-orthogonal (different widths).

    Equal widths: R is scipy's orthogonal Procrustes solution on centred embeddings.
    Ds < Dd: with M = Xᵀ·Y = U·Σ·Vᵀ (thin SVD), R = U·Vᵀ [Ds, Dd] has orthonormal rows and is the exact
    least-squares optimum among such matrices (‖X·R‖ does not depend on R, so only tr(Rᵀ·M) matters).
    R is an isometry into the wider space: distances and angles between source embeddings are kept
    exactly, only the rotation into a Ds-dim subspace is learnt, which cannot over-fit a few thousand
    pairs. Ds > Dd: R has orthonormal columns — a projection onto Dd source directions followed by a
    rotation, the closest thing to an isometry a narrower space allows; U·Vᵀ starts an iterative
    least-squares refinement, as no closed form exists there.
    """

    def __init__(self, config: ProcrustesConfig):
        self.config = config

    def fit(self, src: torch.Tensor, dst: torch.Tensor, *, seed: int = 0) -> nn.Linear:
        """Closed form on centred embeddings; scale and bias fitted afterwards by least squares."""
        _check_pairs(src, dst)
        xc, yc, mx, my = _centred(src, dst)
        cross = xc.T @ yc
        if xc.shape[1] == yc.shape[1]:
            rot = scipy.linalg.orthogonal_procrustes(xc, yc)[0]
        else:
            rot = _polar(cross)
        s = self._scale(xc, rot, cross)
        if xc.shape[1] > yc.shape[1]:
            # ‖X·R‖ now depends on R, so the trace solution is only a start: refine by majorise-minimise
            # (Kiers 1990), R ← polar(M + s·(λI − XᵀX)·R), λ = top eigenvalue of XᵀX; never increases the error.
            gram = xc.T @ xc
            lam = float(scipy.linalg.eigvalsh(gram, subset_by_index=[gram.shape[0] - 1, gram.shape[0] - 1])[0])
            for _ in range(self.config.iterations):
                new = _polar(cross + s * (lam * rot - gram @ rot))
                s = self._scale(xc, new, cross)
                done = np.abs(new - rot).max() < 1e-9
                rot = new
                if done:
                    break
        w = s * rot
        return _linear_from(w, my - mx @ w)

    def _scale(self, xc: np.ndarray, rot: np.ndarray, cross: np.ndarray) -> float:
        if not self.config.scale:
            return 1.0
        mapped = xc @ rot
        return float(np.trace(rot.T @ cross) / max((mapped * mapped).sum(), 1e-30))


def _polar(m: np.ndarray) -> np.ndarray:
    """The matrix with orthonormal rows or columns closest to m (U·Vᵀ of its thin SVD)."""
    u, _, vt = scipy.linalg.svd(m, full_matrices=False)
    return u @ vt


LINEAR_COSINE = Component(kind="converter", name="linear-cosine", factory=LinearCosineConverter,
                          config_class=LinearCosineConfig,
                          description="the paper's converter: linear map trained on 1 − cosine (SGD or Adam)")
LSTSQ = Component(kind="converter", name="lstsq", factory=LstsqConverter, config_class=LstsqConfig,
                  description="closed-form least squares with bias (scipy), optional ridge")
PROCRUSTES = Component(kind="converter", name="procrustes", factory=ProcrustesConverter,
                       config_class=ProcrustesConfig,
                       description="orthogonal Procrustes (scipy) for equal widths, semi-orthogonal otherwise; "
                                   "plus scale and bias")
