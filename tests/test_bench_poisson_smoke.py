"""`python -m bench.poisson --quick` still runs end to end (CI catches a broken benchmark)."""
import json

import torch


def test_bench_poisson_quick(tmp_path):
    from bench.poisson import main

    out = tmp_path / "poisson.json"
    assert main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {"eager", "compile", "torch"} <= {r["impl"] for r in rows}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["median_ms"] > 0 for r in rows)
    eager = next(r for r in rows if r["impl"] == "eager" and r["mode"] == "fwd+bwd")
    assert eager["x_eager"] == 1.0


def test_bench_poisson_case_matches_the_fused_loss():
    from bench.poisson import eager_loss, make_case
    from txfm_kernels import rectified_tanh_poisson_nll

    z, x = make_case(3, 500, torch.float32, "cpu")
    ours = rectified_tanh_poisson_nll(z, x, backend="torch")
    torch.testing.assert_close(ours, eager_loss(z, x), rtol=1e-5, atol=1e-4)
