"""TxFM model: config and presets, encoder, decoder, count losses (arXiv:2605.31562, model and loss).

* :class:`TxFMConfig`, :data:`PRESETS` (``tiny``, ``S``, ``B``, ``L``), :func:`preset`
* :class:`TxFM` — ``forward(sample) -> loss``,
  ``embed(gene_ids, values, key_padding_mask) -> [B, d]``,
  ``decoder_gene_weights() -> [G, hidden]`` (``[G, d]`` with ``decoder_depth=0``),
  ``tokenizer.codebook [G, d-1]``
* ``TxFMConfig.backend`` picks the :mod:`txfm_kernels` backend of every op; ``"torch"`` runs
  each op's one torch reference, for comparison and debugging
"""
from __future__ import annotations

from txfm._lazy import lazy_exports

_EXPORTS = {
    "ACTIVATIONS": "config", "LOSSES": "config", "PRESETS": "config", "TxFMConfig": "config",
    "preset": "config", "CountLoss": "losses", "TxFM": "txfm_model",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
