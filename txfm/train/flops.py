"""FLOPs of a TxFM training step and model FLOPs utilisation (MFU).

Counted: matrix products only (2 FLOPs per multiply-add), forward, per sample. ``N = K + 1``
tokens, width ``d``, MLP width ``r d``, ``n`` blocks, decoder width ``H`` with ``D`` hidden
layers, vocabulary ``G``::

    block (all N queries)   (8 + 4r) N d^2          QKV 6Nd^2, output 2Nd^2, MLP 4rNd^2
                          + 4 N^2 d                 scores QK^T 2N^2d, weighted sum AV 2N^2d
    last block (CLS query)  4 N d^2 + 4 N d         K and V of all tokens; Q, AV, output
                          + (4 + 4r) d^2            projection and MLP of the CLS token alone
    decoder                 2 (d H + (D-1) H^2 + H G)     (D = 0: 2 d G)

Training = 3 x forward (the backward costs two products per forward product). Element-wise
work (tokens, LayerNorm, GELU, softmax, the loss over G genes, the sampler) adds no FLOPs
here: it is memory-bound and shows up as time, not as counted work, so MFU measures how close
the step gets to doing nothing but its matrix products at peak.

TxFM-B (N = 2049, d = 768, r = 4, 12 blocks, H = 768, G = 44,349): 466 GFLOP forward,
**1.40 TFLOP per training sample**. MFU = samples/s x FLOPs/sample / peak; at 45% of an
H100 SXM's 989 dense bf16 TFLOP/s that is ~318 samples/s per GPU (the paper: ~92).
"""
from __future__ import annotations

import torch

# Dense (no sparsity) peak TFLOP/s by device-name fragment, for bf16/fp16 and for tf32.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7},
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7},
    "H100 80GB HBM3": {"bf16": 989.4, "tf32": 494.7},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0},
    "A100": {"bf16": 312.0, "tf32": 156.0},
    "L40S": {"bf16": 362.0, "tf32": 181.0},
    "A10G": {"bf16": 125.0, "tf32": 62.5},
    "RTX 4090": {"bf16": 165.2, "tf32": 82.6},
}


def forward_flops(config, n_genes: int) -> dict[str, float]:
    """Forward FLOPs per sample by part: ``blocks``, ``attention``, ``decoder``, ``total``."""
    n, d, r = config.k + 1, config.dim, config.mlp_ratio
    full = config.depth - 1
    blocks = full * (8 + 4 * r) * n * d * d + (4 * n * d * d + (4 + 4 * r) * d * d)
    attention = full * 4 * n * n * d + 4 * n * d
    h, depth = config.decoder_hidden, config.decoder_depth
    if depth == 0:
        decoder = 2 * d * n_genes
    else:
        decoder = 2 * (d * h + (depth - 1) * h * h + h * n_genes)
    return {"blocks": float(blocks), "attention": float(attention), "decoder": float(decoder),
            "total": float(blocks + attention + decoder)}


def train_flops_per_sample(config, n_genes: int) -> float:
    """FLOPs of forward + backward for one sample (3 x forward)."""
    return 3.0 * forward_flops(config, n_genes)["total"]


def peak_flops(device: torch.device | str, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of ``device`` for ``precision`` (``bf16`` or ``tf32``/``fp32``); None
    when unknown (CPUs, unlisted GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_properties(device).name
    key = "bf16" if precision in ("bf16", "fp16") else "tf32"
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in name:
            return peaks[key] * 1e12
    return None


def mfu(samples_per_s: float, config, n_genes: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] of one device, or None without a known peak."""
    if not peak:
        return None
    return samples_per_s * train_flops_per_sample(config, n_genes) / peak
