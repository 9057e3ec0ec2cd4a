"""Count activations and reconstruction losses of TxFM (arXiv:2605.31562, model and loss and the Table 5 ablations).

The decoder's logits ``z [B, G]`` become predicted log1p-normalised values ``x_hat`` through
an *activation*:

==================  ==========================================================================
activation          x_hat
==================  ==========================================================================
rectified_tanh      ``alpha * relu(tanh(z / beta))`` (default; range [0, alpha))
relu                ``relu(z)`` (the paper saw it diverge mid-training)
clamped_relu        ``min(relu(z), alpha)``
softmax             ``log1p(L * softmax(z))`` over the row's observable genes **(our choice)**:
                    a predicted composition scaled to the library size, on the target's scale
==================  ==========================================================================

and a *loss* compares ``x_hat`` with the target ``x = log1p(L c / sum c)``, per gene, then
takes the mean over each row's kept genes (its observable genes, arXiv:2605.31562, loss) and over rows:

==========  ==================================================================================
loss        per gene
==========  ==================================================================================
poisson     ``exp(x_hat) - x_hat * exp(x)`` (arXiv:2605.31562, loss; fused kernel for rectified_tanh)
nb          negative binomial NLL of the raw count ``c = s (exp(x) - 1)``, mean
            ``mu = s (exp(x_hat) - 1)``, size factor ``s = sum(c) / L``, per-gene inverse
            dispersion ``theta_g = exp(log_theta_g)`` (learned)
zinb        NB plus a per-gene zero-inflation probability ``pi_g = sigmoid(pi_logit_g)``
            (learned) **(our choice: per gene, like theta)**
mse         ``(x_hat - x)^2``
smoothl1    ``smooth_l1(x_hat, x)`` (Huber, beta = 1)
==========  ==================================================================================

Everything here is eager PyTorch in fp32 except the default pair (poisson + rectified_tanh),
which unless ``backend="torch"`` runs :func:`txfm_kernels.rectified_tanh_poisson_nll`: one pass
over the logits, no ``[B, G]`` intermediate, the compact per-dataset gene mask as is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from txfm_kernels.poisson import rectified_tanh_poisson_nll

from txfm_kernels.poisson.reference import dense_gene_mask, masked_row_mean, rectified_tanh
from .config import TxFMConfig

_EPS = 1e-8
# Losses whose constant-predictor optimum is the mean target mean(x), which the gene
# statistics hold at one target_sum only (txfm.data.stats); the others need mean(exp(x)).
MEAN_TARGET_LOSSES = ("mse", "smoothl1")


class CountLoss(nn.Module):
    """Activation + loss head: ``forward(logits, target, gene_mask, library_size) -> scalar``.

    ``logits [B, G]`` (any float dtype; the eager math runs in fp32), ``target [B, G]`` fp32
    log1p-normalised values, ``gene_mask`` None / ``[G]`` / ``[B, G]`` bool / ``RowGeneMask``
    (True = gene counts in the loss), ``library_size [B]`` raw counts per row (NB/ZINB only).
    Holds the per-gene NB/ZINB parameters (``log_theta``, ``pi_logit``; ``[G]`` each).
    """

    def __init__(self, config: TxFMConfig, n_genes: int):
        super().__init__()
        self.loss = config.loss
        self.activation = config.activation
        self.alpha = config.alpha
        self.beta = config.beta
        self.target_sum = float(config.target_sum)
        self.config = config  # config.backend is read at each call
        if self.loss in ("nb", "zinb"):
            self.log_theta = nn.Parameter(torch.zeros(n_genes))
        if self.loss == "zinb":
            # start with little zero inflation: sigmoid(-3) ~ 5%
            self.pi_logit = nn.Parameter(torch.full((n_genes,), -3.0))

    @property
    def fused(self) -> bool:
        """Whether this head runs on the fused kernel (poisson + rectified_tanh + fused ops)."""
        return (self.config.backend != "torch" and self.loss == "poisson"
                and self.activation == "rectified_tanh")

    def predict(self, logits: torch.Tensor, gene_mask=None) -> torch.Tensor:
        """``x_hat [B, G]`` fp32: predicted log1p-normalised values."""
        z = logits.float()
        if self.activation == "rectified_tanh":
            return rectified_tanh(z, self.alpha, self.beta)
        if self.activation == "relu":
            return torch.relu(z)
        if self.activation == "clamped_relu":
            return torch.relu(z).clamp_max(self.alpha)
        mask = dense_gene_mask(gene_mask, z.shape[0], z.shape[1], z.device)
        if mask is not None:
            z = z.masked_fill(~mask, float("-inf"))
        return torch.log1p(self.target_sum * torch.softmax(z, dim=-1))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, gene_mask=None,
                library_size: torch.Tensor | None = None) -> torch.Tensor:
        if self.loss == "poisson" and self.activation == "rectified_tanh":
            # the op: fused kernels, or (backend="torch") its one torch reference
            return rectified_tanh_poisson_nll(logits, target, gene_mask, alpha=self.alpha,
                                              beta=self.beta, reduction="mean",
                                              backend=self.config.backend)
        x_hat = self.predict(logits, gene_mask)
        x = target.float()
        if self.loss == "poisson":
            per_gene = torch.exp(x_hat) - x_hat * torch.exp(x)
        elif self.loss == "mse":
            per_gene = (x_hat - x) ** 2
        elif self.loss == "smoothl1":
            per_gene = F.smooth_l1_loss(x_hat, x, reduction="none", beta=1.0)
        else:
            per_gene = self._nb_nll(x_hat, x, library_size)
        mask = dense_gene_mask(gene_mask, x.shape[0], x.shape[1], x.device)
        if mask is not None:  # left-out genes add nothing (a NaN there included)
            per_gene = per_gene.masked_fill(~mask, 0.0)
        return masked_row_mean(per_gene, mask)

    def _nb_nll(self, x_hat, x, library_size):
        if library_size is None:
            raise ValueError(f"loss={self.loss!r} needs library_size [B] (raw counts per row; "
                             "MaskedSample.library_size)")
        size = (library_size.float() / self.target_sum)[:, None]
        counts = size * torch.expm1(x)
        mu = size * torch.expm1(x_hat) + _EPS
        theta = torch.exp(self.log_theta.float())[None, :]
        log_theta_mu = torch.log(theta + mu)
        log_nb = (torch.lgamma(counts + theta) - torch.lgamma(theta) - torch.lgamma(counts + 1.0)
                  + theta * (torch.log(theta) - log_theta_mu)
                  + counts * (torch.log(mu) - log_theta_mu))
        if self.loss == "nb":
            return -log_nb
        log_pi = F.logsigmoid(self.pi_logit.float())[None, :]
        log_1m_pi = F.logsigmoid(-self.pi_logit.float())[None, :]
        log_nb0 = theta * (torch.log(theta) - log_theta_mu)
        zero = torch.logaddexp(log_pi.expand_as(log_nb0), log_1m_pi + log_nb0)
        return -torch.where(counts < 0.5, zero, log_1m_pi + log_nb)


def logit_bias_init(config: TxFMConfig) -> float:
    """Initial decoder output bias **(our choice)**: start in the live region of the activation.

    Rectified tanh and ReLU have zero gradient at ``z <= 0``; a gene whose logits all start
    negative would never learn. We start at the logit where ``x_hat = 1`` (log1p of ~1.7
    normalised counts), inside the range of typical targets.
    """
    if config.activation == "rectified_tanh":
        return config.beta * math.atanh(1.0 / config.alpha)
    if config.activation in ("relu", "clamped_relu"):
        return 1.0
    return 0.0


def inverse_activation(x_hat: torch.Tensor, config: TxFMConfig) -> torch.Tensor:
    """Logits whose activation is ``x_hat`` (fp32, any shape; softmax: over the last dim, up to
    a constant). ``x_hat`` is kept inside ``[0, alpha)`` where the inverse exists."""
    x_hat = x_hat.float().clamp(0.0, config.alpha * (1.0 - 1e-6))
    if config.activation == "rectified_tanh":
        return config.beta * torch.atanh(x_hat / config.alpha)
    if config.activation in ("relu", "clamped_relu"):
        return x_hat
    # softmax: log1p(L softmax(z)) = x_hat  <=>  softmax(z) = expm1(x_hat) / L
    return torch.log(torch.expm1(x_hat).clamp_min(1e-30))


def optimal_logits(stats, config: TxFMConfig) -> torch.Tensor:
    """``[G]`` fp32 logits whose prediction is each gene's constant-predictor optimum.

    ``stats``: :class:`txfm.data.stats.GeneStats` of the training corpus. Poisson, NB and ZINB
    take ``x_hat* = log(mean(exp(x)))`` (the Poisson optimum), MSE and SmoothL1 the mean
    target ``mean(x)``; the activation is then inverted. Predictions are kept at
    ``x_hat >= 0.01``, inside the live region of rectified tanh and ReLU, so that no gene
    starts where its gradient is exactly 0.

    Raises:
        ValueError: an MSE-type loss with ``stats`` kept at another ``target_sum``
            (:meth:`txfm.data.stats.GeneStats.mean_target`).
    """
    if config.loss in MEAN_TARGET_LOSSES:
        x_hat = torch.as_tensor(stats.mean_target(config.target_sum))
    else:
        x_hat = torch.log(torch.as_tensor(stats.mean_exp_target(config.target_sum)))
    return inverse_activation(x_hat.clamp_min(0.01), config)
