"""Smoke test: ``python -m bench.train --quick`` runs and reports both paths."""
import json

import torch


def test_bench_train_quick(tmp_path):
    from bench.train import main

    n = torch.get_num_threads()
    try:
        rows = main(["--quick", "--device", "cpu", "--threads", "1", "--json",
                     str(tmp_path / "train.json")])
    finally:
        torch.set_num_threads(n)
    assert [r["impl"] for r in rows] == ["eager", "fused"]
    assert all(r["samples_per_s"] > 0 and r["step_ms"] > 0 for r in rows)
    assert rows[1]["x_eager"] is not None
    payload = json.loads((tmp_path / "train.json").read_text())
    assert payload["benchmark"].startswith("train step") and len(payload["rows"]) == 2


def test_bench_train_times_each_token_form(tmp_path):
    from bench.train import main

    n = torch.get_num_threads()
    try:
        rows = main(["--quick", "--device", "cpu", "--threads", "1", "--tokens", "split",
                     "--tokens", "none", "--reps", "1"])
    finally:
        torch.set_num_threads(n)
    assert [(r["tokens"], r["impl"]) for r in rows] == [
        ("split", "eager"), ("split", "fused"), ("none", "eager"), ("none", "fused")]
    assert all(r["x_eager"] is not None for r in rows)


def test_bench_train_quick_runs_every_preset_not_only_tiny(tmp_path):
    """``bench.gpu_check --quick`` runs ``--preset S --preset B --quick``: a preset's K (2,048)
    must shrink to the quick corpus's genes instead of failing the config check."""
    from bench.train import main

    n = torch.get_num_threads()
    try:
        rows = main(["--quick", "--device", "cpu", "--threads", "1", "--preset", "S",
                     "--no-eager", "--reps", "1"])
    finally:
        torch.set_num_threads(n)
    assert [(r["preset"], r["impl"]) for r in rows] == [("S", "fused")]
    assert rows[0]["k"] == rows[0]["genes"] == 500 and rows[0]["step_ms"] > 0
