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
