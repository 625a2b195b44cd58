"""Novelty: how unlike the training images an image is (out-of-distribution detection), higher = more unlike.

- ``msp``: 1 - the maximum softmax probability (Hendrycks & Gimpel 2017), the baseline;
- ``energy``: -T logsumexp(logits / T) (Liu et al. 2020);
- ``mahalanobis``: the smallest squared Mahalanobis distance of the penultimate row (the input of the head's
  last Linear) to a class mean, under one covariance shared by the classes (Lee et al. 2018), fitted on the
  train rows. Rows wider than ``DIMS`` are first projected on the ``DIMS`` directions of largest within-class
  variance (PCA of the train rows less their class mean), so the statistics stay small: 4 MB for 4096-d rows
  instead of 64 MB for a full precision matrix. On digits 256 directions kept the full width's AUROC within
  0.01 where 64 lost up to 0.08 (docs/performance.md).

An image is flagged as novel when its score passes the threshold that ``PASS_RATE`` of the val images stay
under (the split-conformal quantile, so at least that share of new in-distribution images pass).
Pure tensor code: nothing here reads a file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vggft.model.conformal import conformal_quantile

SCORES = ("msp", "energy", "mahalanobis")
DIMS = 256
PASS_RATE = 0.95
_SHRINK = 1e-3  # added to the covariance's diagonal, times its mean variance: a few rows still invert
STAT_KEYS = ("projection", "means", "whiten")


def msp_score(logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    return 1.0 - torch.softmax(logits.double() / (temperature or 1.0), dim=1).max(dim=1).values


def energy_score(logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    t = temperature or 1.0
    return -t * torch.logsumexp(logits.double() / t, dim=1)


class GaussianFit:
    """What ``fit_gaussian`` needs, gathered a batch at a time (``add``) so the train rows are never all held:
    per-class sums and counts, and the rows themselves while there are no more of them than their width
    (an SVD of so few rows is fast), then, instead, the sum of their outer products (width x width, float64;
    the rows shifted by the first batch's mean so the scatter keeps its precision)."""

    def __init__(self, classes: int):
        self.classes, self.count = classes, 0
        self.shift: torch.Tensor | None = None
        self.sums = self.counts = torch.zeros(0, dtype=torch.float64)
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []  # (shifted rows, labels); None: folded
        self.outer: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        rows, labels = rows.detach().double().cpu(), labels.detach().long().cpu()
        if self.shift is None:
            self.shift = rows.mean(dim=0)
            self.sums = torch.zeros(self.classes, rows.shape[1], dtype=torch.float64)
            self.counts = torch.zeros(self.classes, dtype=torch.float64)
        rows = rows - self.shift
        self.sums.index_add_(0, labels, rows)
        self.counts += torch.bincount(labels, minlength=self.classes).double()
        self.count += len(rows)
        if self.kept is not None and self.count <= rows.shape[1]:
            self.kept.append((rows, labels))
            return
        if self.kept is not None:  # past the width: fold what was kept into the outer products
            self.outer = sum((r.T @ r for r, _ in self.kept), torch.zeros(rows.shape[1], rows.shape[1]).double())
            self.kept = None
        assert self.outer is not None
        self.outer += rows.T @ rows

    def stats(self, dims: int = DIMS) -> dict[str, torch.Tensor]:
        """Class means and a shared covariance (projected to ``dims`` if wider), as float32 tensors:
        ``projection`` (width, d), ``means`` (classes, d) and ``whiten`` (d, d), the Cholesky factor L of the
        precision (L L^T = Sigma^-1). A class with no row gets no mean (a row of NaN, never nearest)."""
        if self.shift is None:
            raise ValueError("no rows to fit the novelty statistics on")
        means = self.sums / self.counts.clamp(min=1).unsqueeze(1)  # of the shifted rows
        width = len(self.shift)
        if self.kept is not None:  # few rows: the within-class residuals themselves
            residual = torch.cat([rows - means[labels] for rows, labels in self.kept])
            top = torch.linalg.svd(residual, full_matrices=False).Vh[:dims].T if width > dims else None
            projection = top if top is not None else torch.eye(width, dtype=torch.float64)
            z = residual @ projection
            scatter = z.T @ z
        else:
            assert self.outer is not None
            full = self.outer - (means.T * self.counts) @ means  # sum of (x - m_c)(x - m_c)^T
            top = torch.linalg.eigh(full).eigenvectors[:, -dims:].flip(1) if width > dims else None
            projection = top if top is not None else torch.eye(width, dtype=torch.float64)
            scatter = projection.T @ full @ projection
        covariance = scatter / max(self.count - int((self.counts > 0).sum()), 1)
        covariance += _SHRINK * covariance.diagonal().mean().clamp(min=1e-12) * torch.eye(len(covariance))
        whiten = torch.linalg.cholesky(torch.linalg.inv(covariance))
        centred = (means + self.shift) @ projection
        centred[self.counts == 0] = float("nan")
        return {"projection": projection.float(), "means": centred.float(), "whiten": whiten.float()}


def fit_gaussian(rows: torch.Tensor, labels: torch.Tensor, classes: int, dims: int = DIMS) -> dict[str, torch.Tensor]:
    """``GaussianFit`` over ``rows`` at once (in chunks of 4096 rows)."""
    fit = GaussianFit(classes)
    for start in range(0, len(rows), 4096):
        fit.add(rows[start : start + 4096], labels[start : start + 4096])
    return fit.stats(dims)


def mahalanobis_score(rows: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """min over classes of (z - m_c)^T Sigma^-1 (z - m_c), z the projected row."""
    whiten = stats["whiten"].double()
    z = rows.detach().double().cpu() @ stats["projection"].double() @ whiten
    centres = stats["means"].double() @ whiten
    distances = torch.cdist(z, centres.nan_to_num(nan=float("inf"))).square()
    return distances.nan_to_num(nan=float("inf")).min(dim=1).values


def novelty_threshold(scores: torch.Tensor, pass_rate: float = PASS_RATE) -> float | None:
    """The score that ``pass_rate`` of new in-distribution images stay under (None: too few val images)."""
    return conformal_quantile(scores, pass_rate)


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an outside image scores higher than an inside one), ties counted half."""
    a, b = inside.double().view(1, -1), outside.double().view(-1, 1)
    return float(((b > a).double() + 0.5 * (b == a).double()).mean())


def fpr_at_tpr(inside: torch.Tensor, outside: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of outside images that pass the threshold ``tpr`` of the inside images stay under."""
    threshold = torch.quantile(inside.double(), tpr)
    return float((outside.double() <= threshold).double().mean())


@contextlib.contextmanager
def penultimate_rows(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While inside, every forward pass through ``model``'s last Linear appends that Linear's input (float32,
    on the CPU) to the list yielded: the penultimate rows."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    kept: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, inputs, _out: kept.append(inputs[0].detach().float().cpu()))
    try:
        yield kept
    finally:
        handle.remove()
