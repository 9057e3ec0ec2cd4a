"""txfm_kernels: fused Triton / CUDA / C++ kernels for TxFM, usable on their own.

Ops (one package each, mirroring ``csrc/<op>/``):

* :mod:`txfm_kernels.poisson`  rectified tanh + Poisson NLL over the gene vocabulary
* :mod:`txfm_kernels.tokens`   gene-embedding gather + value concat (+ CLS) = encoder tokens
* :mod:`txfm_kernels.sample`   CSR counts -> normalised, masked encoder inputs + dense target

In each: ``__init__.py`` (argument checks, the ``torch.library`` op, autograd, the function and
module), ``triton.py`` (Triton kernels), ``native.py`` (the C++/CUDA libraries through ctypes),
``reference.py`` (the eager PyTorch reference). What they share is in ``_common.py``.
``available_backends()`` says which implementations can run here and why not.
"""
from .backends import BACKENDS, BackendInfo, available_backends, resolve_backend
from .masks import ObservableGenes, RowGeneMask
from .poisson import (ALPHA, BETA, PoissonNLLLoss, RectifiedTanh, RectifiedTanhPoissonNLLLoss,
                      poisson_nll_loss, rectified_tanh, rectified_tanh_poisson_nll)
from .sample import TARGET_SUM, MaskedSample, masked_sample
from .tokens import GeneTokenizer, gene_tokens

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendInfo", "available_backends", "resolve_backend",
    "ObservableGenes", "RowGeneMask",
    "ALPHA", "BETA", "rectified_tanh", "rectified_tanh_poisson_nll", "poisson_nll_loss",
    "RectifiedTanh", "RectifiedTanhPoissonNLLLoss", "PoissonNLLLoss",
    "gene_tokens", "GeneTokenizer",
    "TARGET_SUM", "MaskedSample", "masked_sample",
]
