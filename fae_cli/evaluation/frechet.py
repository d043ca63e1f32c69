"""Gaussian statistics of features and the Fréchet distance between two Gaussians, in float64.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to Inception features:
    d² = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½.
For any factors with Σ1 = F1ᵀ F1 and Σ2 = F2ᵀ F2, the non-zero eigenvalues of Σ1 Σ2 are those of
(F1 F2ᵀ)(F1 F2ᵀ)ᵀ, so tr (Σ1 Σ2)^½ is the nuclear norm (sum of singular values) of F1 F2ᵀ.
A side fitted to N < D features uses its centred features / √(N − 1) as the factor (N x D, exact
and cheap); when only one side has such a factor F, tr (Σ1 Σ2)^½ = tr (F Σ Fᵀ)^½, an N x N
symmetric eigenvalue problem. Other sides use the symmetric square root from `eigh`, with
negative rounding noise clipped to 0. Unlike `sqrtm` or `eigvals` of the non-symmetric product
Σ1 Σ2 (ADM, pytorch-fid, torch-fidelity), this stays accurate for rank-deficient covariances.
The linear algebra runs in torch, so `torch.set_num_threads` controls its threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class GaussianStats:
    """Mean and covariance of D-dimensional features (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    """Number of feature vectors they were fitted to; None when read from a statistics file."""
    factor: np.ndarray | None = None
    """A k x D matrix F with Fᵀ F = sigma, k < D (set when fitted to fewer vectors than D)."""

    @classmethod
    def from_features(cls, features: np.ndarray) -> GaussianStats:
        """Fit the mean and unbiased covariance (N − 1 denominator) of N x D features."""
        features = _tensor(features)
        count, width = features.shape
        if count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {count}")
        mu = features.mean(dim=0)
        centred = (features - mu) / (count - 1) ** 0.5
        sigma = centred.T @ centred
        return cls(mu.numpy(), sigma.numpy(), count, centred.numpy() if count < width else None)

    @property
    def width(self) -> int:
        return self.mu.shape[0]

    def root(self) -> torch.Tensor:
        """Return a factor F with Fᵀ F = sigma: the stored one, else the symmetric square root."""
        if self.factor is not None:
            return _tensor(self.factor)
        sigma = _tensor(self.sigma)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (sigma + sigma.T))
        return (eigenvectors * eigenvalues.clamp_min(0.0).sqrt()) @ eigenvectors.T


def frechet_distance(first: GaussianStats, second: GaussianStats) -> float:
    """Return the squared Fréchet distance of two Gaussians, clipped at 0 (never negative)."""
    mu1, mu2 = np.asarray(first.mu, dtype=np.float64), np.asarray(second.mu, dtype=np.float64)
    sigma1, sigma2 = np.asarray(first.sigma, dtype=np.float64), np.asarray(second.sigma, dtype=np.float64)
    width = mu1.shape[0]
    if mu1.shape != (width,) or sigma1.shape != (width, width):
        raise ValueError(f"first Gaussian has mu {mu1.shape} and sigma {sigma1.shape}; expected (D,) and (D, D)")
    if mu2.shape != mu1.shape or sigma2.shape != sigma1.shape:
        raise ValueError(f"Gaussians of different widths: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")

    trace_sqrt_product = _trace_sqrt_product(first, second)

    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)

    # Exact arithmetic gives d² >= 0; rounding leaves a tiny negative value when both Gaussians
    # are (almost) equal. A larger negative value means a covariance was not PSD.
    if distance < 0.0:
        scale = float(np.trace(sigma1) + np.trace(sigma2)) or 1.0
        if distance < -1e-6 * scale:
            log.warning("Fréchet distance %.6g < 0 beyond rounding; a covariance may not be positive semi-definite", distance)
        distance = 0.0
    return distance


def _trace_sqrt_product(first: GaussianStats, second: GaussianStats) -> float:
    """Return tr (Σ1 Σ2)^½ by the cheapest exact route (see the module docstring)."""
    if (first.factor is None) != (second.factor is None):
        low_rank, full = (first, second) if first.factor is not None else (second, first)
        factor = _tensor(low_rank.factor)
        inner = factor @ _tensor(full.sigma) @ factor.T
        eigenvalues = torch.linalg.eigvalsh(0.5 * (inner + inner.T))
        return float(eigenvalues.clamp_min(0.0).sqrt().sum())
    product = first.root() @ second.root().T
    return float(torch.linalg.svdvals(product).sum())


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float64))
