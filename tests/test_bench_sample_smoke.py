"""`python -m bench.sample --quick` still runs end to end (CI catches a broken benchmark)."""
import json

import torch


def test_bench_sample_quick(tmp_path):
    from bench.sample import main

    out = tmp_path / "sample.json"
    assert main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"loop", "eager", "torch"} <= impls
    assert {r["target"] for r in rows} == {True, False}
    assert all(r["median_ms"] > 0 and r["cells_per_s"] > 0 for r in rows)
    loop = next(r for r in rows if r["impl"] == "loop" and r["target"])
    assert loop["x_loop"] == 1.0


def test_bench_baselines_draw_observable_distinct_genes_with_the_right_values():
    from bench.sample import eager_sample, loop_sample, make_batch
    from txfm_kernels import masked_sample

    G, K = 3000, 400
    indptr, indices, counts, obs, ds = make_batch(6, "sc", G, nnz=(50, 300), obs=(200, 1500))
    ours = masked_sample(indptr, indices, counts, n_genes=G, k=K, observable=obs,
                         dataset_ids=ds, seed=0, backend="torch")
    allowed = obs.mask[ds.long()]
    for fn in (loop_sample, eager_sample):
        ids, vals, pad, target = fn(indptr, indices, counts, obs, ds, G, K, True)
        torch.testing.assert_close(target, ours.target, rtol=1e-5, atol=1e-5)
        assert torch.equal(pad, ours.key_padding_mask)
        for b in range(6):
            drawn = ids[b][~pad[b]]
            assert len(set(drawn.tolist())) == drawn.numel()
            assert allowed[b, drawn].all()
            torch.testing.assert_close(vals[b][~pad[b]], target[b, drawn])
