"""pytest-benchmark cases for one TxFM training step (``--benchmark-only`` to run).

    pytest bench/test_bench_train.py --benchmark-only

A small ``tiny`` model (d 64, 2 blocks, K 64) over 1,000 genes, batch 16, on CPU: the eager
reference ops and the fused ``txfm_kernels`` ops side by side (same group), and the fused
step under ``torch.compile``. Each round is one full optimizer step of the real trainer.
"""
from __future__ import annotations

import pytest

from bench.train import _trainer

SMALL = dict(dim=64, depth=2, heads=2, decoder_hidden=128, k=64)


@pytest.mark.parametrize("impl", ["eager", "fused", "fused+compile"])
def test_train_step(benchmark, tmp_path, impl):
    benchmark.group = "train step: tiny d64 x2 blocks, K64, G1000, batch 16 (CPU)"
    tr = _trainer("tiny", 1000, 16, "cpu", impl != "eager", impl == "fused+compile", SMALL,
                  str(tmp_path))
    batches = tr._fetch(tr._stream())
    tr.train_step(batches)  # warm-up (and compile)
    loss, _ = benchmark(tr.train_step, batches)
    assert float(loss) == float(loss)  # finite, not NaN
