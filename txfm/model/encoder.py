"""TxFM encoder: gene tokens -> pre-norm transformer blocks -> CLS embedding (arXiv:2605.31562, model).

Shapes: ``B`` samples, ``K`` shown genes, ``N = K + 1`` tokens (CLS first), width ``d``,
``h`` heads. A sample is a set: no positional encoding; padded genes (rows with fewer than K
observable genes) are zero tokens hidden from attention by a key padding mask.

Block (ViT, pre-norm, LayerScale ``gamma``, stochastic depth ``DropPath``)::

    x = x + DropPath(gamma_1 * Attn(LN(x), key_padding_mask))
    x = x + DropPath(gamma_2 * MLP(LN(x)))        MLP = Linear(d, r d) -> GELU -> Linear(r d, d)

Only the CLS output is used, so the **last block runs its queries, output projection and MLP
on the CLS token alone** (keys and values still come from all N tokens): the same result,
about ``20 / 24`` of a block's matrix FLOPs saved (~7% of TxFM-B's encoder).

Attention (``config.attention``):

* ``auto`` (default): FlashAttention-3 (``flash_attn_interface``, the Hopper build of
  flash-attn) when it is installed, the GPU is a Hopper, the tensors are bf16/fp16 and no row
  is padded; otherwise ``F.scaled_dot_product_attention``, which picks its fastest kernel
  itself (cuDNN on H100: 293 TFLOP/s fwd+bwd at head dim 64, vs 184 for FlashAttention-2,
  measured in ``bench/RESULTS.md``; so FlashAttention-2 is *not* preferred automatically).
* ``sdpa``: always ``F.scaled_dot_product_attention``.
* ``flash``: flash-attn's ``flash_attn_func`` (FA3 if installed, else FA2; error if neither),
  for unpadded bf16/fp16 CUDA batches; SDPA otherwise.
* ``math``: plain matmul + softmax in fp32, the reference.

Stochastic depth takes its per-sample keep decisions from ``drop_keep [depth, B]`` bool when
given (the trainer derives it from ``(seed, step)`` so that runs are reproducible across
resumes and ranks), else draws them from the global RNG.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from txfm_kernels._common import renamed_padding
from txfm_kernels.tokens import GeneTokenizer, gene_tokens

from .config import TxFMConfig

try:  # optional: FlashAttention-3, the Hopper build of flash-attn (hopper/ in its repo)
    from flash_attn_interface import flash_attn_func as _fa3_func
except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA build
    _fa3_func = None
try:  # optional: pip install flash-attn (FlashAttention-2, a CUDA build)
    from flash_attn import flash_attn_func as _fa2_func
except Exception:  # noqa: BLE001
    _fa2_func = None


# "split" tokens: the value that leaves a token's value-scaled half at the scale of its identity
# half; expressed genes' log1p values at target_sum 1e4-1e5 lie around 2-9.
SPLIT_VALUE_SCALE = 4.0


def _flash_fn(backend: str, q: torch.Tensor):
    """The flash-attn function to use for ``q`` under ``backend``, or None for SDPA."""
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return None
    if backend == "auto":
        if _fa3_func is None or torch.cuda.get_device_capability(q.device)[0] != 9:
            return None
        return _fa3_func
    return _fa3_func or _fa2_func


class Attention(nn.Module):
    """Multi-head self-attention, fused QKV projection ``[3d, d]``."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, backend: str):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    def _attend(self, q, k, v, mask):
        """``q [B, h, Nq, hd]``, ``k, v [B, h, N, hd]``, ``mask [B, 1, 1, N]`` bool (True = attend)."""
        if self.backend == "math":
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            return (scores.softmax(-1) @ v.float()).to(q.dtype)
        if self.backend == "flash" and _fa3_func is None and _fa2_func is None:
            raise RuntimeError("attention='flash' needs flash-attn: pip install flash-attn "
                               "(a CUDA build), or use attention='auto'")
        fn = _flash_fn(self.backend, q) if self.backend in ("auto", "flash") and mask is None else None
        if fn is not None:  # flash-attn takes [B, N, h, hd]
            out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out[0] if isinstance(out, tuple) else out  # some FA3 versions add the LSE
            return out.transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                cls_only: bool = False) -> torch.Tensor:
        """``x [B, N, d]`` -> ``[B, N, d]``, or ``[B, 1, d]`` for the CLS query alone."""
        b, n, d = x.shape
        h, hd = self.heads, self.head_dim
        if cls_only:
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :1], w[:d], None if bias is None else bias[:d])
            kv = F.linear(x, w[d:], None if bias is None else bias[d:])
            q = q.view(b, 1, h, hd).transpose(1, 2)
            k, v = kv.view(b, n, 2, h, hd).permute(2, 0, 3, 1, 4)
            nq = 1
        else:
            q, k, v = self.qkv(x).view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
            nq = n
        out = self._attend(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and stochastic depth (rate ``drop_path``)."""

    def __init__(self, config: TxFMConfig, drop_path: float):
        super().__init__()
        d = config.dim
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, config.heads, config.qkv_bias, config.attention)
        self.gamma1 = nn.Parameter(torch.full((d,), config.layerscale_init))
        self.norm2 = nn.LayerNorm(d)
        self.mlp = Mlp(d, config.mlp_hidden)
        self.gamma2 = nn.Parameter(torch.full((d,), config.layerscale_init))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None,
                cls_only: bool = False) -> torch.Tensor:
        """``x [B, N, d]``; ``keep [B]`` bool (None: keep all); ``cls_only`` -> ``[B, 1, d]``."""
        scale = None
        if self.training and self.drop_path > 0.0:
            if keep is None:
                keep = torch.rand(x.shape[0], device=x.device) >= self.drop_path
            # per-sample branch scale: 0 (dropped) or 1 / keep probability
            scale = (keep.to(x.dtype) / (1.0 - self.drop_path))[:, None, None]
        a = self.gamma1 * self.attn(self.norm1(x), mask, cls_only=cls_only)
        x = (x[:, :1] if cls_only else x) + (a if scale is None else a * scale)
        m = self.gamma2 * self.mlp(self.norm2(x))
        return x + (m if scale is None else m * scale)


class Encoder(nn.Module):
    """Tokens -> ``depth`` blocks -> final LayerNorm -> CLS embedding ``[B, d]``."""

    def __init__(self, config: TxFMConfig, n_genes: int):
        super().__init__()
        self.config = config
        self.tokenizer = GeneTokenizer(n_genes, config.dim, cls=True)
        n = config.depth
        rates = [config.drop_path * i / max(n - 1, 1) for i in range(n)]  # linear 0 -> drop_path
        self.blocks = nn.ModuleList(Block(config, r) for r in rates)
        self.norm = nn.LayerNorm(config.dim)
        self.apply(_init_linear)

    def tokens(self, gene_ids, values, key_padding_mask=None, *, pad_mask=None) -> torch.Tensor:
        """``[B, K+1, d]`` encoder input, on ``config.backend`` (``TxFMConfig.token_norm``;
        ``pad_mask=``: the deprecated name of ``key_padding_mask``).

        ``"split"``: the codebook row is RMS-normalised, and its second half is scaled by
        ``x / SPLIT_VALUE_SCALE``, so a token's *direction* turns with its value. The pre-norm
        LayerNorm removes every token's scale, so a value can only survive it as a direction:
        in the literal token ``[E_g ; x]`` the value coordinate dominates and the gene's
        identity is left at ``E_g / x`` (docs/learning.md).
        """
        key_padding_mask = renamed_padding(key_padding_mask, pad_mask, "Encoder.tokens")
        tok, cfg = self.tokenizer, self.config
        codebook = tok.codebook
        if cfg.token_norm in ("rms", "split"):
            codebook = F.rms_norm(codebook, (codebook.shape[-1],))
        t = gene_tokens(codebook, gene_ids, values, cls=tok.cls, key_padding_mask=key_padding_mask,
                        deterministic=tok.deterministic, backend=cfg.backend)
        if cfg.token_norm == "split":
            h, d = (t.shape[-1] - 1) // 2, t.shape[-1]
            # CLS (position 0) keeps its scale; padded genes are zero tokens and stay zero,
            # whatever their values hold (a NaN sentinel times 0 would be NaN). Only the
            # scaled half is multiplied, so backward keeps the [B, K+1, 1] scale, not a
            # token-sized factor.
            v = values if key_padding_mask is None else values.masked_fill(key_padding_mask, 0)
            scale = F.pad(v.to(t.dtype) / SPLIT_VALUE_SCALE, (1, 0), value=1.0)[..., None]
            t = torch.cat([t[..., :h], t[..., h:d - 1] * scale, t[..., d - 1:]], dim=-1)
        return t

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None,
                drop_keep: torch.Tensor | None = None, *,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """CLS embedding ``[B, d]`` of ``gene_ids [B, K]`` int, ``values [B, K]`` float.

        ``key_padding_mask [B, K]`` bool (True = padding) or None when no row is padded (lets
        GPU attention take its fastest, mask-free kernels; ``pad_mask=`` is its deprecated
        name); ``drop_keep [depth, B]`` bool.
        """
        key_padding_mask = renamed_padding(key_padding_mask, pad_mask, "Encoder", stacklevel=5)
        x = self.tokens(gene_ids, values, key_padding_mask)
        mask = None
        if key_padding_mask is not None:
            # [B, 1, 1, N]: True = attend; the CLS key (position 0) is always visible
            mask = F.pad(~key_padding_mask, (1, 0), value=True)[:, None, None, :]
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            keep = None if drop_keep is None else drop_keep[i]
            x = blk(x, mask, keep, cls_only=(i == last))
        return self.norm(x[:, 0])


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
