"""Hessian spectrum of the training loss: Hessian-vector products, Lanczos, power iteration and
stochastic Lanczos quadrature (SLQ) densities.

The loss is the mean over a FIXED list of batches, evaluated with the model in eval mode (BatchNorm
uses its running statistics, dropout is off), so the operator is deterministic and symmetric::

    L(w) = sum_b (n_b / N) * loss_fn(model(x_b; w), y_b),     N = sum_b n_b
    H v  = d/dw <grad L(w), v>                                 (double backprop, Pearlmutter 1994)

The products come from :class:`~samkit.analysis.hvp.HessianOperator` (:mod:`samkit.analysis.hvp`
says how, and what one costs).

``loss_fn`` must return the MEAN loss of its batch (e.g. ``nn.CrossEntropyLoss()``), so the weights
``n_b / N`` turn the batch means into the mean over the whole subset.

Foret et al. (SAM, ICLR 2021, Sec. 4.2) report the spectrum of SGD- and SAM-trained networks from
the Lanczos method of Ghorbani, Krishnan & Xiao (2019, "An Investigation into Neural Net
Optimization via Hessian Eigenvalue Density"): lambda_max at convergence about 25 (SGD) vs 1.0
(SAM), and lambda_max / lambda_5 up to 11.4 (SGD) vs 2.6 (SAM). :func:`hessian_top_eigenvalues`
computes both numbers; :func:`hessian_spectral_density` the whole (smoothed) density.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from samkit.analysis._utils import Batch, LossFn, new_figure, save_figure
from samkit.analysis.hvp import HessianOperator
from samkit.analysis.progress import progress_bar

__all__ = [
    "HessianEigenResult",
    "HessianOperator",
    "LanczosResult",
    "PowerIterationResult",
    "SpectralDensity",
    "gauss_quadrature",
    "hessian_spectral_density",
    "hessian_top_eigenvalues",
    "lanczos",
    "plot_spectral_density",
    "power_iteration_lambda_max",
    "slq_density",
]

#: ``hvp(v) -> H v`` for a flat vector ``v`` of length ``dim``.
MatVec = Callable[[Tensor], Tensor]


def _operator_device(hvp: MatVec, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device(getattr(hvp, "device", "cpu"))


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    # Random vectors are drawn on the CPU and then moved, so a seed gives the same numbers on every
    # device.
    return generator if generator is not None else torch.Generator().manual_seed(seed)


def _random_vector(
    dim: int,
    kind: Literal["gaussian", "rademacher"],
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    if kind == "gaussian":
        v = torch.randn(dim, generator=generator, dtype=torch.float64)
    elif kind == "rademacher":
        v = torch.randint(0, 2, (dim,), generator=generator).to(torch.float64).mul_(2).sub_(1)
    else:
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {kind!r}")
    return v.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Lanczos
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Tridiagonal:
    alphas: Tensor  # (m,) diagonal of T
    betas: Tensor  # (m - 1,) off-diagonal of T
    basis: Tensor | None  # (m, dim) orthonormal Lanczos vectors (rows), if kept
    last_beta: float  # beta_{m+1}: residual coupling, 0 at an invariant subspace

    @property
    def steps(self) -> int:
        return int(self.alphas.numel())

    def matrix(self) -> Tensor:
        t = torch.diag(self.alphas)
        if self.betas.numel():
            t = t + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)
        return t


def _lanczos_tridiagonal(
    matvec: MatVec,
    v0: Tensor,
    num_steps: int,
    *,
    keep_basis: bool = True,
    stop: Callable[[_Tridiagonal], bool] | None = None,
    bar: Any = None,
) -> _Tridiagonal:
    """``num_steps`` of Lanczos with FULL reorthogonalisation (two classical Gram-Schmidt passes
    against every previous vector, "twice is enough"). Stops early at an invariant subspace
    (``beta`` below round-off) or when ``stop(partial)`` says so."""
    dim = v0.numel()
    dtype, device = v0.dtype, v0.device
    m = min(num_steps, dim)
    q = v0 / torch.linalg.vector_norm(v0)
    basis = torch.zeros(m, dim, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(dtype).eps
    scale = 0.0
    last_beta = 0.0
    for j in range(m):
        basis[j] = q
        w = matvec(q).to(dtype=dtype, device=device)
        alpha = float(torch.dot(w, q))
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        for _ in range(2):  # full reorthogonalisation
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(torch.linalg.vector_norm(w))
        alphas.append(alpha)
        scale = max(scale, abs(alpha), beta)
        last_beta = beta
        if bar is not None:
            bar.update(1)
        breakdown = beta <= 10.0 * math.sqrt(dim) * eps * max(scale, 1e-300)
        if j + 1 == m or breakdown:
            if breakdown:
                last_beta = 0.0
            break
        partial = _Tridiagonal(
            torch.tensor(alphas, dtype=torch.float64),
            torch.tensor(betas, dtype=torch.float64),
            None,
            beta,
        )
        if stop is not None and stop(partial):
            break
        betas.append(beta)
        q = w / beta
    n = len(alphas)
    return _Tridiagonal(
        torch.tensor(alphas, dtype=torch.float64),
        torch.tensor(betas[: n - 1], dtype=torch.float64),
        basis[:n] if keep_basis else None,
        last_beta,
    )


def _select(values: Tensor, k: int, which: str) -> Tensor:
    if which == "largest":
        key = values
    elif which == "smallest":
        key = -values
    elif which == "magnitude":
        key = values.abs()
    else:
        raise ValueError(f"which must be 'largest', 'smallest' or 'magnitude', got {which!r}")
    return torch.argsort(key, descending=True)[:k]


@dataclasses.dataclass
class LanczosResult:
    """Top-k Ritz pairs of a symmetric operator.

    ``eigenvalues`` (k,) are sorted as requested by ``which`` (default: largest first);
    ``eigenvectors`` (dim, k) are the Ritz vectors ``Q^T s_i`` (or None); ``residuals`` (k,) the
    Ritz residual norms ``||H y_i - theta_i y_i|| = |beta_{m+1} s_{m,i}|`` (exact arithmetic), an
    upper bound on the distance from ``theta_i`` to the spectrum; ``ritz_values`` all m Ritz
    values, ascending.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    ritz_values: Tensor
    num_steps: int
    converged: bool


def lanczos(
    hvp: MatVec,
    dim: int,
    k: int = 5,
    *,
    num_steps: int | None = None,
    tol: float | None = 1e-6,
    which: Literal["largest", "smallest", "magnitude"] = "largest",
    return_vectors: bool = False,
    v0: Tensor | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> LanczosResult:
    """Top-k eigenvalues (and optionally Ritz vectors) of a symmetric operator by Lanczos with full
    reorthogonalisation (Lanczos 1950; Golub & Van Loan, Matrix Computations, Sec. 10.1).

    From ``q_1 = v0 / ||v0||`` (default Gaussian), ``m`` steps build an orthonormal basis ``Q_m`` of
    the Krylov space ``K_m(H, q_1)`` and the tridiagonal ``T_m = Q_m^T H Q_m``::

        w = H q_j - alpha_j q_j - beta_j q_{j-1},  alpha_j = q_j^T H q_j
        w <- w - Q_j Q_j^T w  (twice)             full reorthogonalisation
        beta_{j+1} = ||w||,   q_{j+1} = w / beta_{j+1}

    The eigenvalues of ``T_m`` (Ritz values) converge to the extreme eigenvalues of ``H`` first.
    With ``m = dim`` (or at an invariant subspace) they are exact.

    Args:
        hvp: ``v -> H v`` on flat vectors (e.g. a :class:`HessianOperator`).
        dim: the operator's size.
        k: how many eigenvalues to return (``k <= dim``).
        num_steps: maximum Lanczos steps (= HVP calls); default ``min(dim, max(3k, k + 50))``.
        tol: stop early once every selected Ritz value has residual bound
            ``|beta_{m+1} s_{m,i}| <= tol * max|theta|``; None: always run ``num_steps``.
        which: ``"largest"`` (algebraic, = lambda_max first), ``"smallest"`` or ``"magnitude"``.
        return_vectors: also return the Ritz vectors (dim, k).
        v0: start vector (default: Gaussian from ``generator`` / ``seed``).
        dtype: precision of the Lanczos vectors and recurrence (float64 by default; the HVP itself
            runs in the parameters' dtype). Memory: ``num_steps * dim`` of this dtype.
        device: where the Lanczos vectors live (default: the operator's ``device`` or CPU).
        progress: progress on stderr, one unit per HVP: a bar on a terminal, lines with an ETA
            otherwise (:mod:`samkit.analysis.progress`); False: none.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, dim={dim}], got {k}")
    m = min(dim, num_steps if num_steps is not None else max(3 * k, k + 50))
    if m < k:
        raise ValueError(f"num_steps={m} must be >= k={k}")
    dev = _operator_device(hvp, device)
    if v0 is None:
        v0 = _random_vector(dim, "gaussian", _generator(generator, seed), dtype, dev)
    else:
        v0 = v0.detach().to(device=dev, dtype=dtype).reshape(-1)
        if v0.numel() != dim:
            raise ValueError(f"v0 has {v0.numel()} entries, expected dim={dim}")

    def converged(t: _Tridiagonal) -> bool:
        if tol is None or t.steps < k:
            return False
        theta, s = torch.linalg.eigh(t.matrix())
        idx = _select(theta, k, which)
        res = (t.last_beta * s[-1, idx]).abs()
        return bool((res <= tol * max(float(theta.abs().max()), 1e-300)).all())

    with progress_bar(
        None, progress, total=m, desc="lanczos", unit="HVP", may_stop_early=tol is not None
    ) as bar:
        t = _lanczos_tridiagonal(hvp, v0, m, keep_basis=True, stop=converged, bar=bar)
    theta, s = torch.linalg.eigh(t.matrix())
    kk = min(k, t.steps)  # fewer only at an invariant subspace smaller than k
    idx = _select(theta, kk, which)
    residuals = (t.last_beta * s[-1, idx]).abs()
    vectors = None
    if return_vectors:
        assert t.basis is not None
        vectors = t.basis.T @ s[:, idx].to(device=t.basis.device, dtype=t.basis.dtype)
    scale = max(float(theta.abs().max()), 1e-300)
    done = t.last_beta == 0.0 or (tol is not None and bool((residuals <= tol * scale).all()))
    return LanczosResult(
        eigenvalues=theta[idx],
        eigenvectors=vectors,
        residuals=residuals,
        ritz_values=theta,
        num_steps=t.steps,
        converged=done,
    )


# --------------------------------------------------------------------------------------------
# Power iteration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PowerIterationResult:
    """Dominant eigenpair estimate: ``eigenvalue`` is the Rayleigh quotient ``v^T H v``."""

    eigenvalue: float
    eigenvector: Tensor
    num_iters: int
    converged: bool


def power_iteration_lambda_max(
    hvp: MatVec,
    dim: int,
    *,
    max_iters: int = 100,
    tol: float = 1e-5,
    v0: Tensor | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> PowerIterationResult:
    """The dominant eigenvalue by power iteration: ``v <- H v / ||H v||``, estimate ``v^T H v``.

    Converges to the eigenvalue of LARGEST MAGNITUDE, at rate ``(|lambda_2| / |lambda_1|)^2`` per
    step for the Rayleigh quotient. Near a minimum the Hessian's negative eigenvalues are small and
    this is lambda_max (the usual use, e.g. Yao et al. 2020 "PyHessian"); away from one prefer
    :func:`lanczos`, which separates both ends of the spectrum. Stops when the relative change of
    the estimate is below ``tol``.
    """
    dev = _operator_device(hvp, device)
    if v0 is None:
        v = _random_vector(dim, "gaussian", _generator(generator, seed), dtype, dev)
    else:
        v = v0.detach().to(device=dev, dtype=dtype).reshape(-1).clone()
    v = v / torch.linalg.vector_norm(v)
    estimate = float("nan")
    converged = False
    it = 0
    bar = progress_bar(
        None, progress, total=max_iters, desc="power iteration", unit="HVP", may_stop_early=True
    )
    with bar:
        for it in range(max_iters):  # noqa: B007 - the count is reported
            w = hvp(v).to(device=dev, dtype=dtype)
            bar.update(1)
            new = float(torch.dot(v, w))
            norm = torch.linalg.vector_norm(w)
            if norm == 0:
                estimate, converged = 0.0, True
                break
            v = w / norm
            if math.isfinite(estimate) and abs(new - estimate) <= tol * max(abs(new), 1e-300):
                estimate, converged = new, True
                break
            estimate = new
    return PowerIterationResult(estimate, v, it + 1, converged)


# --------------------------------------------------------------------------------------------
# Top eigenvalues of a model's Hessian
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HessianEigenResult:
    """Top of the Hessian spectrum of the mean loss over the given batches.

    ``lambda_max_over_lambda_5`` is the bulk-sharpness proxy of Jastrzebski et al. (2020) used by
    Foret et al. (Sec. 4.2); None when fewer than 5 eigenvalues were computed or lambda_5 <= 0.
    """

    eigenvalues: list[float]
    lambda_max: float
    lambda_max_over_lambda_5: float | None
    loss: float
    num_params: int
    num_examples: int
    num_hvp: int
    num_lanczos_steps: int
    converged: bool
    residuals: list[float]
    eigenvectors: Tensor | None = None
    batch_sizes: list[int] | None = None  # the batches the products ran on

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (the eigenvectors are left out)."""
        d = dataclasses.asdict(self)
        d.pop("eigenvectors")
        return d


def hessian_top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    k: int = 5,
    *,
    num_steps: int | None = None,
    tol: float | None = 1e-6,
    return_vectors: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    progress: bool | None = None,
    batch_size: int | Literal["auto"] | None = None,
) -> HessianEigenResult:
    """lambda_max, the top-k eigenvalues and lambda_max / lambda_5 of the Hessian of the mean loss
    over ``batches`` (model in eval mode), by :func:`lanczos` on a :class:`HessianOperator`
    (``batch_size``: its re-batching, default none).

    Cost: at most ``num_steps`` HVPs (:mod:`samkit.analysis.hvp`), fewer at convergence.
    """
    op = HessianOperator(model, loss_fn, batches, batch_size=batch_size)
    res = lanczos(
        op,
        op.dim,
        min(k, op.dim),
        num_steps=num_steps,
        tol=tol,
        return_vectors=return_vectors,
        seed=seed,
        dtype=dtype,
        progress=progress,
    )
    eig = [float(x) for x in res.eigenvalues]
    ratio = eig[0] / eig[4] if len(eig) >= 5 and eig[4] > 0 else None
    return HessianEigenResult(
        eigenvalues=eig,
        lambda_max=eig[0],
        lambda_max_over_lambda_5=ratio,
        loss=op.loss(),
        num_params=op.dim,
        num_examples=op.num_examples,
        num_hvp=op.num_calls,
        num_lanczos_steps=res.num_steps,
        converged=res.converged,
        residuals=[float(r) for r in res.residuals],
        eigenvectors=res.eigenvectors,
        batch_sizes=op.batch_sizes,
    )


# --------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------------


def gauss_quadrature(
    hvp: MatVec,
    v: Tensor,
    num_steps: int,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature nodes and weights of the spectral measure of ``H`` seen from ``v``.

    ``m`` Lanczos steps from ``q_1 = v / ||v||`` give ``T_m = S diag(theta) S^T``; the nodes are
    ``theta_i`` and the weights ``tau_i = S[0, i]^2`` (they sum to 1). Then (Golub & Meurant,
    "Matrices, Moments and Quadrature", 1994)::

        sum_i tau_i f(theta_i)  ~=  v^T f(H) v / v^T v,   EXACT for polynomials f of degree <= 2m-1

    (in exact arithmetic; full reorthogonalisation keeps it so in floating point).
    Fewer than ``m`` nodes come back when the Krylov space is invariant earlier (then it is exact
    for every f).
    """
    return _quadrature(hvp, v, num_steps, dtype, None)


def _quadrature(
    hvp: MatVec, v: Tensor, num_steps: int, dtype: torch.dtype, bar: Any
) -> tuple[np.ndarray, np.ndarray]:
    v = v.detach().reshape(-1).to(dtype=dtype)
    t = _lanczos_tridiagonal(hvp, v, num_steps, keep_basis=True, bar=bar)
    theta, s = torch.linalg.eigh(t.matrix())
    return theta.numpy(), (s[0, :] ** 2).numpy()


@dataclasses.dataclass
class SpectralDensity:
    """A smoothed eigenvalue density from SLQ plus the raw per-probe quadrature.

    ``density`` on ``grid`` integrates to 1 (trapezoid rule). ``nodes[l]`` / ``weights[l]`` are the
    Gauss nodes and weights of probe ``l``. ``dim`` is the operator's size (the number of
    parameters), so ``dim * moment(j)`` estimates ``trace(H^j)``.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    sigma: float
    dim: int
    num_probes: int
    num_steps: int
    probe: str
    seed: int | None

    def moment(self, j: int) -> float:
        """SLQ estimate of ``trace(H^j) / dim``: ``mean_l sum_i tau_i^(l) theta_i^(l)^j``."""
        return float(np.mean([np.sum(w * th**j) for th, w in zip(self.nodes, self.weights)]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: lists of floats."""
        return {
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "nodes": [n.tolist() for n in self.nodes],
            "weights": [w.tolist() for w in self.weights],
            "sigma": self.sigma,
            "dim": self.dim,
            "num_probes": self.num_probes,
            "num_steps": self.num_steps,
            "probe": self.probe,
            "seed": self.seed,
            "trace_estimate": self.dim * self.moment(1),
            "lambda_min_node": float(min(n.min() for n in self.nodes)),
            "lambda_max_node": float(max(n.max() for n in self.nodes)),
        }


def slq_density(
    hvp: MatVec,
    dim: int,
    *,
    num_probes: int = 10,
    num_steps: int = 80,
    probe: Literal["rademacher", "gaussian"] = "rademacher",
    num_points: int = 2000,
    sigma: float | None = None,
    sigma_rel: float = 0.002,
    seed: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> SpectralDensity:
    """Eigenvalue density of ``H`` by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017;
    Ghorbani, Krishnan & Xiao 2019, Sec. 2-3)::

        phi(t) = (1/n) sum_i delta(t - lambda_i)
               ~= (1/P) sum_{l=1..P} sum_{i=1..m} tau_i^(l) g_sigma(t - theta_i^(l))

    with ``P`` probes ``v_l`` (Rademacher, or Gaussian, i.e. uniform on the sphere once normalised;
    for both ``q = v / ||v||`` has ``E[q q^T] = I / n``, so ``E[q^T f(H) q] = trace f(H) / n``),
    :func:`gauss_quadrature` nodes ``theta`` and weights ``tau`` from ``m`` Lanczos
    steps each, and the Gaussian kernel ``g_sigma(x) = exp(-x^2 / 2 sigma^2) / (sigma sqrt(2 pi))``.

    The grid spans ``[min theta - pad, max theta + pad]`` with ``pad = 5 sigma + 1% of the span``;
    the default ``sigma = sigma_rel * span`` (0.2% of the span of the nodes: a narrow kernel that
    keeps the outliers visible on a log scale; pass ``sigma`` to choose it). The density is
    renormalised to integrate to exactly 1 on the grid (trapezoid rule).
    Cost: ``num_probes * num_steps`` HVPs.
    """
    if num_probes < 1 or num_steps < 1 or num_points < 2:
        raise ValueError("num_probes, num_steps must be >= 1 and num_points >= 2")
    dev = _operator_device(hvp, device)
    gen = _generator(generator, seed)
    nodes: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    total = num_probes * min(num_steps, dim)  # HVPs, fewer if a Krylov space is invariant early
    with progress_bar(None, progress, total=total, desc="SLQ", unit="HVP") as bar:
        for _ in range(num_probes):
            v = _random_vector(dim, probe, gen, dtype, dev)
            th, w = _quadrature(hvp, v, num_steps, dtype, bar)
            nodes.append(th)
            weights.append(w)
    lo = float(min(n.min() for n in nodes))
    hi = float(max(n.max() for n in nodes))
    span = hi - lo
    if span <= 0:
        span = max(abs(hi), 1.0)
    if sigma is None:
        sigma = sigma_rel * span
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    pad = 5.0 * sigma + 0.01 * span
    grid = np.linspace(lo - pad, hi + pad, num_points)
    density = np.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    for th, w in zip(nodes, weights):
        z = (grid[:, None] - th[None, :]) / sigma
        density += (np.exp(-0.5 * z**2) * norm) @ w
    density /= num_probes
    total = float(np.trapezoid(density, grid))
    if total > 0:
        density /= total
    return SpectralDensity(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        dim=dim,
        num_probes=num_probes,
        num_steps=num_steps,
        probe=probe,
        seed=seed if generator is None else None,
    )


def hessian_spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    num_probes: int = 10,
    num_steps: int = 80,
    batch_size: int | Literal["auto"] | None = None,
    **kwargs: Any,
) -> SpectralDensity:
    """:func:`slq_density` of the Hessian of the mean loss over ``batches`` (model in eval mode;
    ``batch_size`` as :class:`HessianOperator`'s)."""
    op = HessianOperator(model, loss_fn, batches, batch_size=batch_size)
    return slq_density(op, op.dim, num_probes=num_probes, num_steps=num_steps, **kwargs)


def plot_spectral_density(
    result: SpectralDensity,
    path: str | Path,
    *,
    title: str | None = None,
    log_scale: bool = True,
    floor: float = 1e-8,
) -> Path:
    """Save the density as a PNG; log-scale y axis as in Ghorbani et al. (2019), with values below
    ``floor * max(density)`` clipped so the log axis stays readable."""
    fig = new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    dens = result.density
    if log_scale:
        dens = np.maximum(dens, floor * max(float(dens.max()), 1e-300))
        ax.semilogy(result.grid, dens, lw=1.2)
    else:
        ax.plot(result.grid, dens, lw=1.2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log_scale else "density")
    ax.set_title(title or f"Hessian eigenvalue density (SLQ, {result.num_probes} probes)")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)
