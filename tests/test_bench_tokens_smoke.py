"""`python -m bench.tokens --quick` still runs end to end (CI catches a broken benchmark)."""
import json

import torch


def test_bench_tokens_quick(tmp_path):
    from bench.tokens import main

    out = tmp_path / "tokens.json"
    assert main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"eager", "compile", "torch"} <= impls
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["median_ms"] > 0 for r in rows)
    eager = next(r for r in rows if r["impl"] == "eager" and r["mode"] == "fwd")
    assert eager["x_eager"] == 1.0


def test_bench_tokens_cases_match_the_eager_formula():
    from bench.tokens import eager_tokens, make_case
    from txfm_kernels import gene_tokens

    codebook, gene_ids, values, cls, _ = make_case(3, 50, 16, 400, torch.float32, "cpu")
    assert all(len(set(row.tolist())) == 50 for row in gene_ids)  # drawn without replacement
    torch.testing.assert_close(gene_tokens(codebook, gene_ids, values, cls=cls),
                               eager_tokens(codebook, gene_ids, values, cls), rtol=0, atol=0)
