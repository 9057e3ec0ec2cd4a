"""TxFM decoder: CLS embedding ``[B, d]`` -> logits over the gene vocabulary ``[B, G]`` (arXiv:2605.31562, model).

``decoder_depth = n`` hidden layers of width ``H = decoder_hidden``::

    h = GELU(Linear(d, H)(LN(e)))                      layer 1
    h = h + GELU(Linear(H, H)(LN(h)))                  layers 2..n (residual)
    z = Linear(H, G)(LN(h))                            head

``n = 0`` is a single linear map ``z = Linear(d, G)(LN(e))``. The head's weight
``[G, H]`` is the decoder's gene representation (arXiv:2605.31562, evaluation), :meth:`Decoder.gene_weights`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TxFMConfig
from .losses import logit_bias_init


class ResidualLayer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, h):
        return h + F.gelu(self.fc(self.norm(h)))


class Decoder(nn.Module):
    def __init__(self, config: TxFMConfig, n_genes: int):
        super().__init__()
        d, width = config.dim, config.decoder_hidden
        self.layers = nn.ModuleList()
        if config.decoder_depth > 0:
            self.norm_in = nn.LayerNorm(d)
            self.fc_in = nn.Linear(d, width)
            self.layers.extend(ResidualLayer(width) for _ in range(config.decoder_depth - 1))
            head_in = width
        else:
            self.norm_in = None
            self.fc_in = None
            head_in = d
        self.norm_out = nn.LayerNorm(head_in)
        self.head = nn.Linear(head_in, n_genes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.head.bias, logit_bias_init(config))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """``e [B, d]`` -> logits ``[B, G]`` (bf16 under autocast)."""
        h = e
        if self.fc_in is not None:
            h = F.gelu(self.fc_in(self.norm_in(h)))
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm_out(h))

    def gene_weights(self) -> torch.Tensor:
        """The head's weight ``[G, H]`` (``[G, d]`` for ``decoder_depth = 0``): one row per gene."""
        return self.head.weight
