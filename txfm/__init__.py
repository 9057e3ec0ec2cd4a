"""txfm: TxFM — a masked autoencoder of RNA-seq counts — data, model, trainer and evaluation.

Built on :mod:`txfm_kernels`. Subpackages: :mod:`txfm.data` (synthetic data, converter,
Zarr shards, streaming loader), :mod:`txfm.model`, :mod:`txfm.train`, :mod:`txfm.eval`.
The command line is ``txfm`` (:mod:`txfm.cli`).
"""
__version__ = "0.1.0"
