import pytest
import torch

import txfm_kernels
from txfm_kernels.backends import resolve_backend


def test_available_backends_lists_every_backend_with_a_reason():
    infos = txfm_kernels.available_backends()
    assert set(infos) == {"triton", "cuda", "cpu", "torch"}
    assert infos["torch"].available
    for info in infos.values():
        assert info.detail


def test_auto_on_cpu_prefers_the_cpp_library_when_built():
    expected = "cpu" if txfm_kernels.available_backends("poisson")["cpu"].available else "torch"
    assert resolve_backend("auto", torch.device("cpu"), "poisson") == expected


def test_unknown_backend_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match="backend='fast'.*auto"):
        resolve_backend("fast", torch.device("cpu"), "poisson")


@pytest.mark.parametrize("op, function", [("poisson", "rectified_tanh_poisson_nll"),
                                          ("tokens", "gene_tokens"), ("sample", "masked_sample")])
def test_an_op_is_named_by_its_short_name_or_its_function(op, function):
    assert resolve_backend("auto", "cpu", function) == resolve_backend("auto", "cpu", op)
    assert (txfm_kernels.available_backends(function)["cpu"]
            == txfm_kernels.available_backends(op)["cpu"])
    with pytest.raises(RuntimeError, match=f"^{function}: backend='cuda'"):  # its public name
        resolve_backend("cuda", "cpu", op)
    with pytest.raises(ValueError, match=f"^{function}: device 'gpu' is not a torch device"):
        resolve_backend("auto", "gpu", op)
    for bad in ("poisson_nll", "tokenize"):
        with pytest.raises(ValueError, match=f"op='{bad}' is not one of"):
            resolve_backend("auto", "cpu", bad)
        with pytest.raises(ValueError, match=f"op='{bad}' is not one of"):
            txfm_kernels.available_backends(bad)


def test_cuda_backend_on_cpu_tensors_says_why(monkeypatch):
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        resolve_backend("cuda", torch.device("cpu"), "poisson")


def test_disabled_cpu_library_falls_back_to_torch(monkeypatch):
    from txfm_kernels import _common

    monkeypatch.setenv("TXFM_DISABLE_NATIVE", "cpu")
    _common.cpu_library.cache_clear()
    try:
        assert resolve_backend("auto", torch.device("cpu"), "poisson") == "torch"
        with pytest.raises(RuntimeError, match="disabled by TXFM_DISABLE_NATIVE"):
            resolve_backend("cpu", torch.device("cpu"), "poisson")
    finally:
        monkeypatch.delenv("TXFM_DISABLE_NATIVE")
        _common.cpu_library.cache_clear()


def test_observable_genes_round_trip():
    obs = txfm_kernels.ObservableGenes.from_lists([[3, 1], [0], []], n_genes=5)
    assert obs.counts().tolist() == [2, 1, 0]
    assert obs.genes.tolist() == [1, 3, 0]
    rows = obs.row_mask(torch.tensor([1, 0]))
    assert rows.dense().tolist() == [[True, False, False, False, False],
                                     [False, True, False, True, False]]
    with pytest.raises(ValueError, match=r"gene_lists\[0\]"):
        txfm_kernels.ObservableGenes.from_lists([[7]], n_genes=5)


def test_observable_genes_refuses_what_the_kernels_cannot_index():
    """An empty table gave the triton sampler an out-of-bounds read (a segfault), the C++ one
    an 'internal error' and the torch one an IndexError; a float id was truncated to a gene."""
    OG = txfm_kernels.ObservableGenes
    for make in (lambda: OG.from_lists([], n_genes=6),
                 lambda: OG.from_mask(torch.zeros(0, 6, dtype=torch.bool)),
                 lambda: OG.from_mask(torch.zeros(2, 0, dtype=torch.bool)),
                 lambda: OG(torch.zeros(0, 6, dtype=torch.bool), torch.zeros(1, dtype=torch.int64),
                            torch.zeros(0, dtype=torch.int32))):
        with pytest.raises(ValueError, match="at least one dataset|gene_lists is empty"):
            make()
    for ids in ([0.5], [True], [1, 2.0]):
        with pytest.raises(TypeError, match=r"gene_lists\[1\] must hold integer gene ids"):
            OG.from_lists([[0], ids], n_genes=3)
    # numpy integer ids and empty datasets beside non-empty ones still work
    import numpy as np
    obs = OG.from_lists([np.array([2, 0], dtype=np.uint8), []], n_genes=3)
    assert obs.mask.tolist() == [[True, False, True], [False, False, False]]


def test_the_kernel_docs_examples_run_as_written():
    # a user copies them into a notebook: every name they use must be defined in the block
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "kernels.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/kernels.md python block {i}", "exec"), {})


def _direct_op_cases():
    """(name, call, exception, message) of direct torch.ops.txfm calls whose metadata disagree:
    before each op checked its own contract, the C++ kernels read past ``counts`` or ``values``
    silently, misread an int32 ``indptr`` as int64, and wrote past a too-small ``out`` buffer
    (glibc aborted the process: "free(): invalid pointer")."""
    T, f = torch.tensor, torch.ops.txfm
    ip, ix, c = T([0, 2, 3]), T([0, 5, 1], dtype=torch.int32), T([1.0, 2.0, 3.0])

    def sample(**kw):
        a = dict(indptr=ip, indices=ix, counts=c, obs_indptr=None, obs_genes=None,
                 dataset_ids=None, n_genes=10, k=4)
        a.update(kw)
        return lambda be: f.masked_sample(*a.values(), 1e4, 0, 0, True, False, be)

    def into(k=4, n_genes=10):
        outs = (torch.empty(2, k, dtype=torch.int32), torch.empty(2, k),
                torch.empty(2, k, dtype=torch.bool), torch.empty(2, n_genes), torch.empty(2))
        return lambda be: f.masked_sample_into(ip, ix, c, None, None, None, None, None, 10, 4,
                                               1e4, 0, 0, 0.0, False, be, *outs)

    E, ids = torch.randn(10, 7), T([[0, 5]])

    def tokens(values=torch.randn(1, 2), cls=None, mask=None):
        return lambda be: f.gene_tokens(E, ids, values, cls, mask, be, True, True)

    def poisson(target=torch.rand(2, 10), mask=None, ds=None, mode=0):
        return lambda be: f.poisson_nll(torch.randn(2, 10), target, mask, ds, mode, False, 1.0,
                                        1.0, 0.0, "mean", True, be)

    return [
        ("counts shorter than indices", sample(counts=T([1.0, 2.0])), ValueError,
         r"masked_sample: counts has 2 entries but indices has 3"),
        ("int32 indptr", sample(indptr=ip.int()), TypeError, r"indptr must be int64"),
        ("int64 indices", sample(indices=ix.long()), TypeError, r"indices must be int32"),
        ("float64 counts", sample(counts=c.double()), TypeError, r"counts must be float32"),
        ("k = 0", sample(k=0), ValueError, r"masked_sample: k must be an int >= 1"),
        ("dataset_ids of another B", sample(obs_indptr=T([0, 10]),
                                            obs_genes=torch.arange(10, dtype=torch.int32),
                                            dataset_ids=T([0])),
         ValueError, r"dataset_ids must have shape \[B\] = \(2,\)"),
        ("out narrower than k", into(k=2), ValueError,
         r"masked_sample_into: gene_ids must be a contiguous torch.int32 tensor of shape "
         r"\(2, 4\)"),
        ("target narrower than n_genes", into(n_genes=3), ValueError,
         r"masked_sample_into: target must be .* of shape \(2, 10\)"),
        ("values of another shape", tokens(values=torch.randn(1, 1)), ValueError,
         r"gene_tokens: values \(1, 1\) must have the shape of gene_ids \(1, 2\)"),
        ("values in another dtype", tokens(values=torch.randn(1, 2, dtype=torch.float64)),
         TypeError, r"gene_tokens: values must be in the codebook's dtype"),
        ("cls of another width", tokens(cls=torch.randn(3)), ValueError,
         r"gene_tokens: cls must be \[d\] = \[8\]"),
        ("key_padding_mask of another shape", tokens(mask=T([[True]])), ValueError,
         r"gene_tokens: key_padding_mask \(1, 1\) must have the shape of gene_ids"),
        ("grad of another K", lambda be: f.gene_tokens_backward(torch.randn(1, 1, 8), ids, None,
                                                                10, False, be, True),
         ValueError, r"gene_tokens_backward: grad must be \[B, K \+ has_cls, d\] = \[1, 2, d\]"),
        ("target of another shape", poisson(target=torch.rand(2, 5)), ValueError,
         r"poisson_nll: logits and target must have the same shape"),
        ("mask of another width", poisson(mask=torch.ones(1, 3, dtype=torch.bool), ds=T([0, 0])),
         ValueError, r"poisson_nll: gene_mask.mask must be a bool \[D, G=10\]"),
        ("dataset_ids without a mask", poisson(ds=T([0, 0])), ValueError,
         r"poisson_nll: dataset_ids index the rows of a \[D, G\] mask"),
        ("unknown mode", poisson(mode=9), ValueError, r"poisson_nll: mode must be 0"),
    ]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("case", _direct_op_cases(), ids=lambda case: case[0])
def test_a_direct_op_call_with_inconsistent_arguments_names_the_argument(case, backend):
    """Each torch.library op checks its own contract (shapes, dtypes, devices: metadata only,
    no sync) in its body, so a direct torch.ops.txfm call, which skips the public function,
    gets the public function's kind of message instead of a kernel that reads or writes past
    a buffer."""
    if backend == "cpu" and not txfm_kernels.available_backends("poisson")["cpu"].available:
        pytest.skip("the C++ kernels are not built (TXFM_BUILD_CPU=1 pip install -e .)")
    _, call, exc, message = case
    with pytest.raises(exc, match=message) as info:
        call(backend)
    assert str(info.value).startswith("torch.ops.txfm.")  # names the op the caller called
