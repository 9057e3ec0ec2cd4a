"""TxFM: a masked autoencoder of RNA-seq counts (arXiv:2605.31562, model and loss).

``TxFM(config, n_genes)``: encoder (gene tokens -> transformer -> CLS embedding ``e``),
decoder (``e`` -> logits over all ``G`` genes), loss head (activation + count loss over each
sample's observable genes, shown and masked alike).

>>> from txfm.model import TxFM, preset
>>> model = TxFM(preset("tiny"), n_genes=2000)
>>> loss = model(sample)                       # sample: txfm_kernels.MaskedSample  # doctest: +SKIP
>>> emb = model.embed(gene_ids, values)        # [B, d] CLS embeddings            # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import nn

from txfm_kernels._common import renamed_padding

from .config import TxFMConfig
from .decoder import Decoder
from .encoder import Encoder
from .losses import CountLoss, optimal_logits

_UNSET = object()  # "not given" (None is a meaningful override, e.g. key_padding_mask=None)


class TxFM(nn.Module):
    """Encoder + decoder + loss. Parameters: ``encoder.tokenizer.codebook [G, d-1]``,
    ``encoder.tokenizer.cls [d]``, the blocks, ``decoder.*``, and NB/ZINB's per-gene ``loss.*``.
    """

    def __init__(self, config: TxFMConfig, n_genes: int):
        super().__init__()
        if not isinstance(config, TxFMConfig):
            raise TypeError(f"config must be a TxFMConfig (txfm.model.preset('tiny')), "
                            f"got {type(config).__name__}")
        if int(n_genes) < 1:
            raise ValueError(f"n_genes={n_genes} must be >= 1 (the vocabulary size G)")
        # its own copy (validated as it is made): set_use_fused_ops must not switch the
        # caller's config (a preset, or the config of another model)
        config = config.replace()
        self.config = config
        self.n_genes = int(n_genes)
        self.encoder = Encoder(config, self.n_genes)
        self.decoder = Decoder(config, self.n_genes)
        self.loss = CountLoss(config, self.n_genes)
        # "bf16" / "fp32" once known (txfm.train.load_checkpoint sets it): embedding with
        # precision="auto" on CUDA matches it, see txfm.eval.embed.resolve_precision
        self.trained_precision: str | None = None

    # -- the pieces users reach for ---------------------------------------------------------
    @property
    def tokenizer(self) -> nn.Module:
        """The gene tokenizer; ``.codebook [G, d-1]`` is the encoder's gene representation."""
        return self.encoder.tokenizer

    def decoder_gene_weights(self) -> torch.Tensor:
        """``[G, hidden]`` (``[G, d]`` with ``decoder_depth=0``): the decoder's last weight
        matrix, one row per gene (arXiv:2605.31562, evaluation)."""
        return self.decoder.gene_weights()

    def set_use_fused_ops(self, flag: bool) -> "TxFM":
        """Switch between the fused ``txfm_kernels`` ops and the eager reference ops in place
        (this model's ``config.backend``; the config it was built from is not changed)."""
        self.config.backend = "auto" if flag else "torch"  # tokenizer, loss and sampler read it
        return self

    @torch.no_grad()
    def init_output_bias(self, stats) -> "TxFM":
        """Start the decoder's per-gene output bias at each gene's constant-predictor optimum
        over the training corpus (``stats``: :class:`txfm.data.stats.GeneStats`), instead of
        one constant logit for all genes; see :func:`txfm.model.losses.optimal_logits`."""
        bias = self.decoder.head.bias
        z = optimal_logits(stats, self.config)
        if z.shape != bias.shape:
            raise ValueError(f"gene statistics cover {z.shape[0]} genes, the model {bias.shape[0]}")
        bias.copy_(z.to(bias))
        return self

    # -- forward ----------------------------------------------------------------------------
    def embed(self, gene_ids: torch.Tensor, values: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None, *,
              pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """CLS embeddings ``[B, d]`` (the parameters' dtype) of the shown genes of B cells.

        Args:
            gene_ids: ``[B, K]`` int32 or int64 vocabulary ids in ``[0, G)``, distinct per row.
            values: ``[B, K]`` float (fp32; other float dtypes are computed as given): each
                shown gene's ``log1p(config.target_sum * c / S)``, ``c`` its count and ``S`` the
                cell's total count over the vocabulary; a shown gene with no count is 0 (what
                :func:`txfm_kernels.masked_sample` builds).
            key_padding_mask: ``[B, K]`` bool, True on padding (torch's name; ``pad_mask=`` is
                its deprecated alias), or None when no row is padded. What lies under padding,
                ids or values (NaN too), is never read.

        Uses the module's mode: call ``model.eval()`` first for deterministic embeddings (no
        stochastic depth); :func:`txfm.eval.embed.embed_counts` does.

        Raises (from :func:`txfm_kernels.gene_tokens`, naming the argument):
            ValueError: shapes that differ. IndexError: an id outside ``[0, G)``.
            TypeError: non-integer ids, a non-bool mask.
        """
        key_padding_mask = renamed_padding(key_padding_mask, pad_mask, "TxFM.embed")
        return self.encoder(gene_ids, values, key_padding_mask)

    def logits(self, gene_ids, values, key_padding_mask=None, drop_keep=None, *,
               pad_mask=None) -> torch.Tensor:
        """Decoder logits ``[B, G]`` (``pad_mask=``: deprecated name of ``key_padding_mask``)."""
        key_padding_mask = renamed_padding(key_padding_mask, pad_mask, "TxFM.logits")
        return self.decoder(self.encoder(gene_ids, values, key_padding_mask, drop_keep))

    def predict(self, gene_ids, values, key_padding_mask=None, gene_mask=None, *,
                pad_mask=None) -> torch.Tensor:
        """Predicted log1p-normalised values ``x_hat [B, G]`` fp32 (the activation of the
        logits; ``pad_mask=``: deprecated name of ``key_padding_mask``)."""
        key_padding_mask = renamed_padding(key_padding_mask, pad_mask, "TxFM.predict")
        return self.loss.predict(self.logits(gene_ids, values, key_padding_mask), gene_mask)

    def forward(self, sample=None, *, gene_ids=_UNSET, values=_UNSET, key_padding_mask=_UNSET,
                target=_UNSET, gene_mask=_UNSET, library_size=_UNSET,
                drop_keep=None, pad_mask=_UNSET) -> torch.Tensor:
        """Scalar training loss of a batch.

        Either ``model(sample)`` with a ``MaskedSample`` (fields ``gene_ids, values,
        key_padding_mask, target, gene_mask, library_size``) or the same as keyword tensors.
        Keywords given beside ``sample`` override its fields (e.g. ``key_padding_mask=None``
        when no row is padded).
        ``drop_keep [depth, B]`` bool: stochastic-depth decisions (None: drawn here).

        Shapes: ``gene_ids [B, K]`` int32/int64, ``values [B, K]`` float (log1p-normalised),
        ``key_padding_mask [B, K]`` bool or None, ``target [B, G]`` fp32, ``gene_mask`` None /
        ``[G]`` / ``[B, G]`` bool or a ``RowGeneMask``, ``library_size [B]`` (counts per cell;
        the MSE/NB losses' scale). Returns a 0-d fp32 loss: the mean over cells of the
        per-gene loss over observable genes (arXiv:2605.31562, loss; :mod:`txfm.model.losses`).

        Raises:
            ValueError: ``gene_ids``, ``values`` or ``target`` missing; the kernels'
                ``TypeError`` / ``ValueError`` / ``IndexError`` naming a bad tensor.
        """
        if pad_mask is not _UNSET:  # the deprecated name
            key_padding_mask = renamed_padding(None if key_padding_mask is _UNSET
                                               else key_padding_mask, pad_mask, "TxFM.forward",
                                               stacklevel=5)
        elif key_padding_mask is _UNSET and sample is not None \
                and not hasattr(sample, "key_padding_mask") and hasattr(sample, "pad_mask"):
            # a batch object of before the rename: its mask is not dropped silently
            key_padding_mask = renamed_padding(None, sample.pad_mask, "TxFM.forward (sample)",
                                               stacklevel=5)
        fields = dict(gene_ids=gene_ids, values=values, key_padding_mask=key_padding_mask,
                      target=target, gene_mask=gene_mask, library_size=library_size)
        fields = {k: (getattr(sample, k, None) if v is _UNSET else v) for k, v in fields.items()}
        if fields["gene_ids"] is None or fields["values"] is None or fields["target"] is None:
            raise ValueError("TxFM.forward needs gene_ids, values and target (a MaskedSample "
                             "made with return_target=True, or the tensors as keywords)")
        gene_mask = None if self.config.include_unobserved else fields["gene_mask"]
        z = self.logits(fields["gene_ids"], fields["values"], fields["key_padding_mask"], drop_keep)
        return self.loss(z, fields["target"], gene_mask, fields["library_size"])
