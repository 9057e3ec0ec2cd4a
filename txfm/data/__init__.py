"""txfm.data: synthetic data, the AnnData/10x -> Zarr v3 shard converter, and the streaming loader.

* :func:`txfm.data.synth.generate` / ``txfm data synth`` — synthetic raw counts with known
  gene programs, perturbation effects and relationship pairs (the embedded default data).
* :func:`txfm.data.convert.convert` / ``txfm data convert`` — inputs (``.h5ad``, 10x folders,
  10x ``.h5``) into one gene vocabulary, QC-filtered, globally shuffled, written as
  anndata-on-zarr-v3 CSR shards (readable by ``anndata.read_zarr`` and annbatch), atomically
  and resumably.
* :class:`Manifest` — vocabulary, datasets and their observable genes, per-gene non-zero
  counts, shard list.
* :class:`ShardLoader` — shuffled :class:`CSRBatch` mini-batches (torch ``IterableDataset``;
  DataLoader workers and DDP ranks see disjoint cells; exact mid-epoch resume).
* :func:`txfm.data.demo.ensure_demo_shards` — the synthetic demo, converted, for plain
  ``txfm train``.

Names are imported lazily so that ``txfm data convert`` does not pay for importing torch.
(``convert`` is not re-exported here: ``txfm.data.convert`` is the module.)
"""
from __future__ import annotations

from txfm._lazy import lazy_exports

_EXPORTS = {
    "Manifest": "manifest", "DatasetInfo": "manifest", "ShardInfo": "manifest",
    "ShardLoader": "loader", "CSRBatch": "loader",
    "generate": "synth", "SynthResult": "synth",
    "ensure_demo_shards": "demo", "ensure_demo": "demo",
    "Vocabulary": "vocab",
    "InputError": "readers", "ShardReadError": "layout",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
