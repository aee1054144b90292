"""Built-in embedding converters: maps g(x) = W·x + b from source to destination LLM input embeddings.

Each is a `converter` component; `fit(src [P, Ds], dst [P, Dd], seed=...)` returns nn.Linear(Ds, Dd).
Fits run in fp32 (gradient) or fp64 (closed form) whatever the embeddings' dtype.
"""

from __future__ import annotations

import dataclasses
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
    match_norm: bool = help_field(
        True, help="after the fit, scale W and b so the mapped embeddings have the destination's mean norm: the "
                   "cosine loss leaves the scale free (false: whatever scale SGD left, as the official code)")


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
        # Seeded init without touching the caller's RNG: manual_seed also reseeds every initialised CUDA device.
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
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
            if cfg.match_norm:
                # A merged projector otherwise writes soft prompts at an arbitrary multiple of the
                # destination's embedding norm (8.4x on the world's OPT-s → OPT-m caption-token fit).
                gx = layer(src.detach().float())
                scale = y.norm(dim=-1).mean() / gx.norm(dim=-1).mean().clamp_min(1e-12)
                if torch.isfinite(scale) and scale > 0:
                    layer.weight.mul_(scale)
                    layer.bias.mul_(scale)
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


# ---------------------------------------------------------------------------------------------- ridge
@dataclass
class RidgeConfig:
    """Closed-form ridge least squares; the penalty is picked by cross-validation on the pairs."""

    lambdas: list = help_field([1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0],
                               help="candidate penalties, as multiples of the mean eigenvalue of XᵀX (scale-free)")
    folds: int = help_field(5, help="cross-validation folds that choose the penalty (held-out mean cosine)")
    whiten: Literal["none", "standardise", "zca"] = help_field(
        "none", help="transform both spaces before the fit (and undo it after): standardise = per dimension, "
                     "zca = full whitening with a shrunk covariance")
    shrink: float = help_field(0.1, help="zca: covariance shrinkage towards its mean eigenvalue (0-1)")


class RidgeConverter(Converter):
    """argmin ‖X·W + b − Y‖² + λ‖W‖², λ chosen on held-out folds of the pairs, optionally after whitening."""

    def __init__(self, config: RidgeConfig):
        if not config.lambdas or min(config.lambdas) < 0:
            raise ConfigError("converter ridge: lambdas must be non-empty and ≥ 0", "e.g. lambdas=[0.01,0.1,1]")
        if config.folds < 2:
            raise ConfigError("converter ridge: folds must be ≥ 2", "e.g. folds=5")
        if not 0.0 <= config.shrink <= 1.0:
            raise ConfigError("converter ridge: shrink must be within [0, 1]", "e.g. shrink=0.1")
        self.config = config
        self.chosen: float | None = None  # the penalty of the last fit (relative), for reports

    def fit(self, src: torch.Tensor, dst: torch.Tensor, *, seed: int = 0) -> nn.Linear:
        """Whiten, choose λ by k-fold held-out cosine, refit on every pair, fold the whitening back in."""
        _check_pairs(src, dst)
        xc, yc, mx, my = _centred(src, dst)
        a_in, _ = _whitener(xc, self.config.whiten, self.config.shrink)
        a_out, a_out_inv = _whitener(yc, self.config.whiten, self.config.shrink)
        xw, yw = xc @ a_in, yc @ a_out
        self.chosen = self._choose(xw, yw, yc, a_out_inv, seed)
        w = a_in @ _ridge(xw, yw, self.chosen) @ a_out_inv
        return _linear_from(w, my - mx @ w)

    def _choose(self, xw: np.ndarray, yw: np.ndarray, yc: np.ndarray, a_out_inv: np.ndarray, seed: int) -> float:
        n = xw.shape[0]
        lambdas = sorted(self.config.lambdas)
        if n < 2 * self.config.folds:
            return lambdas[len(lambdas) // 2]
        folds = np.random.default_rng(seed).permutation(n) % self.config.folds
        scores = []
        for lam in lambdas:
            cos = []
            for k in range(self.config.folds):
                fit, held = folds != k, folds == k
                # Held-out cosine in the original (un-whitened, centred) space: what the merge will use.
                pred = xw[held] @ _ridge(xw[fit], yw[fit] - yw[fit].mean(0), lam) @ a_out_inv
                cos.append(_row_cosine(pred, yc[held]))
            scores.append(float(np.concatenate(cos).mean()))
        return lambdas[int(np.argmax(scores))]


def _ridge(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Ridge solution with λ relative to the mean eigenvalue of XᵀX."""
    gram = x.T @ x
    scale = max(float(np.trace(gram)) / gram.shape[0], 1e-30)
    return scipy.linalg.solve(gram + lam * scale * np.eye(gram.shape[0]), x.T @ y, assume_a="sym")


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def _whitener(xc: np.ndarray, mode: str, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, A⁻¹) with X·A standardised ('standardise') or whitened ('zca'); identity for 'none'."""
    d = xc.shape[1]
    if mode == "none":
        return np.eye(d), np.eye(d)
    if mode == "standardise":
        std = np.maximum(xc.std(0), 1e-12)
        return np.diag(1.0 / std), np.diag(std)
    cov = xc.T @ xc / max(1, xc.shape[0] - 1)
    cov = (1 - shrink) * cov + shrink * (np.trace(cov) / d) * np.eye(d)  # fewer pairs than dimensions: keep it invertible
    vals, vecs = scipy.linalg.eigh(cov)
    vals = np.maximum(vals, 1e-12 * vals.max())
    return (vecs / np.sqrt(vals)) @ vecs.T, (vecs * np.sqrt(vals)) @ vecs.T


@dataclass
class RidgeWhitenedConfig(RidgeConfig):
    """Ridge after ZCA-whitening both spaces (every direction weighs the same in the fit and the penalty)."""

    whiten: Literal["none", "standardise", "zca"] = help_field(
        "zca", help="none | standardise (per dimension) | zca (full whitening with a shrunk covariance)")


# ---------------------------------------------------------------------------------------------- anchor-omp
@dataclass
class AnchorOmpConfig(RidgeConfig):
    """Ridge on the pairs plus anchor-based pairs for tokens without a string match (OMP, arXiv 2506.06607)."""

    atoms: int = help_field(8, help="anchor tokens per unmatched token (non-zero coefficients of the OMP fit)")
    weight: float = help_field(0.5, help="weight of an anchor-based pair relative to a string-matched one")


class AnchorOmpConverter(Converter):
    """Tokens without a partner get one built from anchors, then a ridge map is fitted on all pairs.

    As tokenizer transplantation does: an unmatched destination token is expressed as a sparse combination
    of paired (anchor) destination tokens by orthogonal matching pursuit, and the same combination of the
    anchors' source embeddings becomes its source partner; an unmatched source token likewise gets a
    destination partner. The map stays linear (it is merged into the projector); the anchor-based pairs
    tell it where the tokens the string match could not pair should go. Without unmatched tokens
    (`fit(src, dst)` alone) this is `ridge`.
    """

    uses_unpaired = True

    def __init__(self, config: AnchorOmpConfig):
        if config.atoms < 1 or config.weight < 0:
            raise ConfigError("converter anchor-omp: atoms must be ≥ 1 and weight ≥ 0", "e.g. atoms=8 weight=0.5")
        self.config = config
        self.ridge = RidgeConverter(config)

    def fit(self, src: torch.Tensor, dst: torch.Tensor, *, seed: int = 0, unpaired_src: torch.Tensor | None = None,
            unpaired_dst: torch.Tensor | None = None) -> nn.Linear:
        """Build anchor-based partners for the unpaired rows, then fit ridge on real + anchor-based pairs."""
        _check_pairs(src, dst)
        x, y = src.detach().double().cpu().numpy(), dst.detach().double().cpu().numpy()
        mx, my = x.mean(0), y.mean(0)
        extra_x, extra_y = [], []
        k = min(self.config.atoms, x.shape[0])
        if unpaired_src is not None and len(unpaired_src):
            u = unpaired_src.detach().double().cpu().numpy()
            extra_x.append(u)
            extra_y.append(omp_coefficients(u - mx, x - mx, k) @ (y - my) + my)
        if unpaired_dst is not None and len(unpaired_dst):
            v = unpaired_dst.detach().double().cpu().numpy()
            extra_x.append(omp_coefficients(v - my, y - my, k) @ (x - mx) + mx)
            extra_y.append(v)
        if not extra_x or self.config.weight == 0:
            return self.ridge.fit(src, dst, seed=seed)
        lam = self.ridge.config.lambdas
        self.ridge.fit(src, dst, seed=seed)  # λ chosen on the real pairs only: the anchor-based ones are not evidence
        self.chosen = self.ridge.chosen
        try:
            self.ridge.config = dataclasses.replace(self.ridge.config, lambdas=[self.chosen])
            rows = np.sqrt(np.concatenate([np.ones(len(x)), np.full(sum(map(len, extra_x)), self.config.weight)]))
            ax, ay = np.concatenate([x, *extra_x]), np.concatenate([y, *extra_y])
            # Weighted least squares = ordinary least squares on rows scaled by √weight around the weighted mean.
            wx = (ax * rows[:, None] ** 2).sum(0) / (rows ** 2).sum()
            wy = (ay * rows[:, None] ** 2).sum(0) / (rows ** 2).sum()
            w = _ridge((ax - wx) * rows[:, None], (ay - wy) * rows[:, None], self.chosen)
        finally:
            self.ridge.config = dataclasses.replace(self.ridge.config, lambdas=lam)
        return _linear_from(w, wy - wx @ w)


def omp_coefficients(targets: np.ndarray, atoms: np.ndarray, k: int) -> np.ndarray:
    """Coefficients C [T, A] with at most `k` non-zeros per row such that C·atoms ≈ targets (greedy OMP).

    All targets advance together: at each step every row adds the atom most correlated with its residual
    and re-solves its least squares on the atoms chosen so far (batched normal equations).
    """
    n_t, n_a = targets.shape[0], atoms.shape[0]
    k = min(k, n_a)
    unit = atoms / np.maximum(np.linalg.norm(atoms, axis=1), 1e-30)[:, None]
    chosen = np.zeros((n_t, 0), dtype=np.int64)
    coef = np.zeros((n_t, 0))
    residual = targets.copy()
    scale = np.maximum(np.linalg.norm(targets, axis=1), 1e-30)
    rows = np.arange(n_t)
    for _ in range(k):
        score = np.abs(residual @ unit.T)
        score[rows[:, None], chosen] = -1.0
        done = np.linalg.norm(residual, axis=1) <= 1e-9 * scale
        pick = np.argmax(score, axis=1)
        if done.any():  # an exact fit keeps its atoms: repeat one (its coefficient is merged below)
            pick[done] = chosen[done, 0] if chosen.shape[1] else pick[done]
        chosen = np.concatenate([chosen, pick[:, None]], axis=1)
        sel = atoms[chosen]  # [T, j, D]
        gram = sel @ sel.transpose(0, 2, 1) + 1e-12 * np.eye(chosen.shape[1])
        coef = np.linalg.solve(gram, (sel @ targets[:, :, None]))[:, :, 0]
        residual = targets - (coef[:, :, None] * sel).sum(1)
    out = np.zeros((n_t, n_a))
    np.add.at(out, (np.repeat(rows, chosen.shape[1]), chosen.ravel()), coef.ravel())
    return out


# ---------------------------------------------------------------------------------------------- identity
class IdentityConverter(Converter):
    """g(x) = x, for a source sharing the destination's vocabulary and embedding space (e.g. its surrogate)."""

    def __init__(self, config: dict | None = None):
        if config:
            raise ConfigError(f"converter identity takes no settings, got {', '.join(config)}",
                              "drop the converter settings")

    def fit(self, src: torch.Tensor, dst: torch.Tensor, *, seed: int = 0) -> nn.Linear:
        """The identity map at the embeddings' width; refuses widths that differ."""
        if src.shape[-1] != dst.shape[-1]:
            raise DataError(f"identity converter needs equal embedding widths, got {src.shape[-1]} and "
                            f"{dst.shape[-1]}", "use a fitted converter (--converter linear-cosine)")
        layer = nn.Linear(src.shape[-1], dst.shape[-1])
        with torch.no_grad():
            layer.weight.copy_(torch.eye(src.shape[-1]))
            layer.bias.zero_()
        return layer


LINEAR_COSINE = Component(kind="converter", name="linear-cosine", factory=LinearCosineConverter,
                          config_class=LinearCosineConfig,
                          description="the paper's converter: linear map trained on 1 − cosine (SGD or Adam)")
LSTSQ = Component(kind="converter", name="lstsq", factory=LstsqConverter, config_class=LstsqConfig,
                  description="closed-form least squares with bias (scipy), optional ridge")
PROCRUSTES = Component(kind="converter", name="procrustes", factory=ProcrustesConverter,
                       config_class=ProcrustesConfig,
                       description="orthogonal Procrustes (scipy) for equal widths, semi-orthogonal otherwise; "
                                   "plus scale and bias")
RIDGE = Component(kind="converter", name="ridge", factory=RidgeConverter, config_class=RidgeConfig,
                  description="closed-form ridge least squares, penalty chosen by held-out cosine on the pairs; "
                              "optional whitening")
RIDGE_WHITENED = Component(kind="converter", name="ridge-whitened", factory=RidgeConverter,
                           config_class=RidgeWhitenedConfig,
                           description="ridge after ZCA-whitening both embedding spaces (undone afterwards)")
ANCHOR_OMP = Component(kind="converter", name="anchor-omp", factory=AnchorOmpConverter,
                       config_class=AnchorOmpConfig,
                       description="ridge on the string pairs plus anchor-based pairs for unmatched tokens "
                                   "(each a sparse OMP combination of paired anchors, as tokenizer transplantation)")
IDENTITY = Component(kind="converter", name="identity", factory=IdentityConverter,
                     description="g(x) = x: for a source whose LLM shares the destination's vocabulary and widths "
                                 "(its surrogate); `auto` picks it there")
