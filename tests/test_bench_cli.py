"""The benchmark commands' option checks (one ``error:`` line, exit 2, before any work) and the
CPU peak-memory probe; the benchmarks themselves run under ``pytest bench``."""
from __future__ import annotations

import pathlib

import pytest
import torch


CASES = {
    "poisson": [["--impls", "bogus"], ["--impls", ""], ["--dtype", "fp16"], ["--device", "foo"], ["--reps", "-3"],
                ["--batches", "0"], ["--G", "0"], ["--json", "{tmp}"],
                ["--csv", "{tmp}/afile/x.csv"], ["--quick", "--G", "100"],
                ["--batches", "100000000", "--G", "44349"], ["--batches", "1", "--G", "10**11"],
                ["--batches", "4,4"], ["--dtype", "fp32,fp32"], ["--impls", "eager,eager"],
                ["--json", "{tmp}/r.out", "--csv", "{tmp}/r.out"]],
    "tokens": [["--sizes", "4x1"], ["--K", "0"], ["--K", "200", "--V", "100"],
               ["--quick", "--sizes", "2x64"], ["--sizes", "100000000x768"],
               ["--V", "10000000000"], ["--sizes", "2x64,2x64"], ["--dtype", "fp32,fp32"]],
    "sample": [["--cases", "0:sc"], ["--cases", "256:foo"], ["--K", "0"], ["--quick", "--K", "8"],
               ["--cases", "4:sc", "--K", "50000"], ["--cases", "100000000:sc", "--impls", "cpu"],
               ["--cases", "4:sc,4:sc"], ["--cases", "-4:sc"]],
    "train": [["--preset", "XL"], ["--batch", "-4"], ["--threads", "-1"], ["--quick", "--batch", "4"],
              ["--preset", "tiny", "--preset", "tiny"]],
    "loader": [["--batch-size", "0"], ["--codecs", "zstdx"], ["--quick", "--codecs", "lz4"],
               ["--quick", "--cells", "100000"], ["--quick", "--batch-size", "64"],
               ["--quick", "--cache", "{tmp}/afile"],
               ["--cells", "100", "--batch-size", "256", "--cache", "{tmp}/c"],
               ["--codecs", "none,none"],
               ["--nnz", "5000", "--genes", "100", "--cache", "{tmp}/c"]],
    "gpu_check": [["--only", "poison"]],
}


@pytest.mark.parametrize("bench, argv", [(b, a) for b, cases in CASES.items() for a in cases],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_benchmark_options_give_one_error_line_before_any_work(bench, argv, tmp_path, capsys):
    import importlib

    (tmp_path / "afile").write_text("")
    module = importlib.import_module(f"bench.{bench}")
    main = module.parse_args if bench == "loader" else module.main
    with pytest.raises(SystemExit) as exc:
        main([a.format(tmp=tmp_path).replace("10**11", str(10**11)) for a in argv])
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""  # nothing measured, nothing printed


@pytest.mark.parametrize("bench, argv, named", [
    ("sample", ["--cases", "4:sc,4:sc"], "--cases: 4:sc is given twice"),
    ("tokens", ["--sizes", "2x64,2x64"], "--sizes: 2x64 is given twice"),
    ("poisson", ["--batches", "4,4"], "--batches: 4 is given twice"),
    ("sample", ["--cases", "-4:sc"], "--cases '-4:sc': give B:kind pairs with B >= 1")])
def test_a_repeated_or_negative_case_is_named_as_written(bench, argv, named, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"bench.{bench}").main(argv)
    assert named in capsys.readouterr().err


def test_cpu_peak_memory_sees_buffers_the_heap_had_freed():
    """After a few calls glibc serves a call's 10.8 MiB temporaries from freed heap blocks that
    are still resident, so the RSS would not rise (this read 0 MiB); trimming the heap first
    makes them count: three [64, 44349] fp32 temporaries, 32.5 MiB."""
    from bench.common import peak_extra_mib

    gen = torch.Generator().manual_seed(0)
    z, x = torch.randn(64, 44_349, generator=gen), torch.rand(64, 44_349, generator=gen)

    def fn():
        return ((z * 2).exp() - x).sum()

    for _ in range(5):  # warm-up, as the timing loop does
        fn()
    got = peak_extra_mib(fn, "cpu")
    assert got is not None and got > 20, got


def test_annbatch_label_names_the_installed_versions(tmp_path):
    """The loader table names the annbatch it measured, read from its venv (not a fixed
    string): a venv without it reports None."""
    import importlib.metadata
    import pathlib
    import sys

    from bench.loader import annbatch_versions

    got = annbatch_versions(pathlib.Path(sys.executable))
    assert set(got) == {"annbatch", "zarrs", "zarr"}
    assert got["zarr"] == importlib.metadata.version("zarr")
    try:
        expected = importlib.metadata.version("annbatch")
    except importlib.metadata.PackageNotFoundError:
        expected = None
    assert got["annbatch"] == expected


def test_interrupted_benchmark_exits_130_with_one_line(capsys):
    from bench.common import run

    def main():
        raise KeyboardInterrupt

    assert run(main) == 130
    assert capsys.readouterr().err.strip() == "interrupted: no results written"
    assert run(lambda: [{"row": 1}]) == 0  # bench.train's main returns its rows


def test_terminated_benchmark_exits_143_with_one_line(capsys):
    """SIGTERM (a scheduler's time limit) killed a benchmark at once, past every cleanup."""
    import os
    import signal
    import time

    from bench.common import run

    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # run's handler raises here
        raise AssertionError("SIGTERM was not raised as an interrupt")

    caller = []
    before = signal.signal(signal.SIGTERM, lambda *a: caller.append(a))
    try:
        assert run(main) == 143
        assert signal.getsignal(signal.SIGTERM).__code__.co_filename == __file__  # restored
    finally:
        signal.signal(signal.SIGTERM, before)
    assert caller == []
    assert capsys.readouterr().err.strip() == "terminated: no results written"


def test_interrupted_gpu_check_exits_130_with_one_line(capsys, monkeypatch):
    from bench import gpu_check

    def main():
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "main", main)
    assert gpu_check._stoppable() == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_prepared_inputs_stopped_mid_write_are_not_kept(tmp_path, monkeypatch):
    """bench.loader reuses a prepared source ``.h5ad`` that exists; one cut off mid-write was
    taken for a finished one. A failed annbatch store is not left behind either."""
    import subprocess

    import bench.loader as loader
    from txfm.data import synth

    def stopped(self, *a):
        raise KeyboardInterrupt  # the file is open and partly written

    monkeypatch.setattr(synth._H5adWriter, "append_csr", stopped)
    src = tmp_path / "cache" / "source.h5ad"
    with pytest.raises(KeyboardInterrupt):
        loader.make_source(src, 200, 50, 10)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert loader.make_source(src, 200, 50, 10) == src
    import anndata as ad

    assert ad.read_h5ad(src).shape == (200, 50)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["source.h5ad"]

    def fails(cmd, **kw):
        pathlib.Path(cmd[-1]).mkdir()
        (pathlib.Path(cmd[-1]) / "zarr.json").write_text("{")
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(subprocess, "run", fails)
    with pytest.raises(subprocess.CalledProcessError):
        loader.make_annbatch(pathlib.Path("python"), src, tmp_path / "cache" / "annbatch.zarr")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["source.h5ad"]


def test_result_files_are_whole_or_absent(tmp_path):
    from bench.common import _write_atomic

    out = tmp_path / "r.csv"
    _write_atomic(out, lambda f: f.write("old\n"))

    def broken(f):
        f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_atomic(out, broken)
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


def test_loader_benchmark_runs_on_past_the_end_of_a_small_corpus():
    """The warm-up and timed batches ran past a small corpus's one epoch: StopIteration."""
    from bench.loader import _endless

    it = _endless(lambda: iter([1, 2]))
    assert [next(it) for _ in range(5)] == [1, 2, 1, 2, 1]
    with pytest.raises(RuntimeError, match="--batch-size"):
        next(_endless(lambda: iter([])))


def test_kernels_info_refuses_an_unknown_backend(capsys):
    from txfm_kernels.info import main

    with pytest.raises(SystemExit) as exc:
        main(["--require", "bogus"])
    assert exc.value.code == 2
    assert "--require 'bogus': not a backend" in capsys.readouterr().err


def test_a_reader_that_goes_away_does_not_cost_the_result_files(tmp_path):
    """``python -m bench.sample --json R | head -0``: the run stopped at its first progress
    line on stdout (exit 141) and never wrote R. Progress now goes to stderr and the files are
    written before the table is printed, so they are whole; the table's print then stops the
    command quietly."""
    import json

    from _launch import reader_gone
    from txfm.cli import CLOSED_PIPE_STATUS

    out, table = tmp_path / "r.json", tmp_path / "r.csv"
    code, err = reader_gone(["-m", "bench.sample", "--quick", "--impls", "cpu,torch", "--json",
                             str(out), "--csv", str(table)])
    assert code == CLOSED_PIPE_STATUS and "Traceback" not in err, err
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"cpu", "torch"} and all(r["median_ms"] > 0 for r in rows)
    assert len(table.read_text().splitlines()) == len(rows) + 1
    assert b"\r" not in table.read_bytes()  # "\n" line ends, as pandas writes them


def test_result_files_name_the_versions_that_made_them():
    from bench.common import machine_info

    info = machine_info("cpu")
    assert info["txfm"] and info["torch"] and info["numpy"]
    assert {"anndata", "zarr", "h5py", "scipy", "triton"} <= set(info)
