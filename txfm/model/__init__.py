"""TxFM model: config and presets, encoder, decoder, count losses (arXiv:2605.31562, model and loss).

* :class:`TxFMConfig`, :data:`PRESETS` (``tiny``, ``S``, ``B``, ``L``), :func:`preset`
* :class:`TxFM` — ``forward(sample) -> loss``,
  ``embed(gene_ids, values, key_padding_mask) -> [B, d]``,
  ``decoder_gene_weights() -> [G, hidden]`` (``[G, d]`` with ``decoder_depth=0``),
  ``tokenizer.codebook [G, d-1]``
* ``TxFMConfig.backend`` picks the :mod:`txfm_kernels` backend of every op; ``"torch"`` runs
  each op's one torch reference, for comparison and debugging
"""
from .config import ACTIVATIONS, LOSSES, PRESETS, TxFMConfig, preset
from .losses import CountLoss
from .txfm_model import TxFM

__all__ = ["TxFMConfig", "PRESETS", "preset", "TxFM", "CountLoss", "LOSSES", "ACTIVATIONS"]
