"""A damaged ``SHARDS/manifest.json`` and bad ``random:`` data specs: one clear error that
names the file (or ``--data`` and the key) and says what to do, never a traceback or a
numpy message; valid manifests (current and older formats) and specs work as before."""
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from txfm.data import Manifest
from txfm.data.convert import convert
from txfm.data.inputs import open_loader
from txfm.data.synth import generate
from txfm.train.synthetic import RandomCSRSource, parse_random_spec

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--set", "dim=16", "--set", "depth=1", "--set", "heads=2", "--set", "decoder_hidden=16",
        "--k", "8", "--batch-size", "8", "--steps", "1", "--eager", "--no-progress", "--no-plot",
        "--no-tensorboard"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small converted corpus: two single-cell datasets and a bulk one, train and val."""
    raw = generate(tmp_path_factory.mktemp("raw"), cells=300, genes=80, perturbations=3,
                   batches=2, bulk=12, seed=1)
    out = tmp_path_factory.mktemp("shards") / "s"
    convert(raw.datasets, out, min_cells=1, min_genes=1, val_fraction=0.1, shard_cells=100,
            seed=0, progress=False, log=lambda s: None)
    return out


def _with_manifest(shards: Path, tmp_path: Path, change) -> Path:
    """A copy of the collection whose manifest document is ``change(doc)`` (or, when it
    returns None, ``doc`` changed in place); ``change`` may also return bytes or text."""
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    doc = json.loads((bad / "manifest.json").read_text())
    new = change(doc)
    new = doc if new is None else new
    if isinstance(new, bytes):
        (bad / "manifest.json").write_bytes(new)
    else:
        (bad / "manifest.json").write_text(new if isinstance(new, str) else json.dumps(new))
    return bad


def _drop(*keys):
    """Delete ``doc[k0][k1]...`` (the last key's entry)."""
    def change(doc):
        obj = doc
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
    return change


def _set(value, *keys):
    def change(doc):
        obj = doc
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value(obj[keys[-1]]) if callable(value) else value
    return change


def _stats_missing_one(doc):
    del doc["gene_frac_sum"]


# (change, what the message names beside the file)
CORRUPT = {
    # not an object / not JSON
    "top-level-list": (lambda doc: [1, 2, 3], "the top level is a list"),
    "top-level-string": (lambda doc: '"txfm"', "the top level is a string"),
    "not-json": (lambda doc: "{not json", "corrupt manifest"),
    "truncated": (lambda doc: json.dumps(doc)[:200], "corrupt manifest"),
    "not-utf8": (lambda doc: b"\xff\xfe\x00garbage", "corrupt manifest"),
    # required keys missing (the user's example first)
    "only-format-and-version": (lambda doc: {"format": "txfm-shards", "version": 2},
                                "vocab is missing"),
    **{f"missing-{k}": (_drop(k), f"{k} is missing")
       for k in ("vocab", "counts_dtype", "indices_dtype", "codec", "max_count",
                 "integer_counts", "seed", "fingerprint", "shards", "datasets", "gene_nnz")},
    "missing-vocab.file": (_drop("vocab", "file"), "vocab.file is missing"),
    "missing-vocab.hash": (_drop("vocab", "hash"), "vocab.hash is missing"),
    **{f"missing-shards.{k}": (_drop("shards", 1, k), rf"shards\[1\].{k} is missing")
       for k in ("path", "split", "n_cells", "nnz", "cell_offset")},
    **{f"missing-datasets.{k}": (_drop("datasets", 0, k), rf"datasets\[0\].{k} is missing")
       for k in ("name", "kind", "n_cells", "observable", "report")},
    "stats-partly-missing": (_stats_missing_one, "gene_frac_sum missing beside"),
    # wrong types
    "vocab-a-string": (_set("vocab.tsv", "vocab"), "vocab is a string, not an object"),
    "shards-an-object": (_set({}, "shards"), "shards is an object, not a list"),
    "datasets-null": (_set(None, "datasets"), "datasets is null, not a list"),
    "shard-a-number": (_set(5, "shards", 0), r"shards\[0\] is an integer, not an object"),
    "gene_nnz-a-string": (_set("many", "gene_nnz"), "gene_nnz is a string, not a list"),
    "gene_nnz-floats": (_set(lambda v: [x + 0.5 for x in v], "gene_nnz"),
                        r"gene_nnz\[0\] is \d+\.5; gene_nnz must hold integers >= 0"),
    "integer_counts-a-string": (_set("yes", "integer_counts"), "integer_counts"),
    "every_chunk_written-a-number": (_set(1, "every_chunk_written"), "every_chunk_written"),
    "seed-a-float": (_set(1.5, "seed"), "seed is 1.5, not an integer >= 0"),
    "max_count-a-string": (_set("big", "max_count"), "max_count"),
    "max_count-nan": (_set(math.nan, "max_count"), "max_count is nan, not a finite number"),
    "version-a-string": (_set("two", "version"), "version"),
    "version-0": (_set(0, "version"), "version is 0, not an integer >= 1"),
    "codec-unknown": (_set("gzip", "codec"), "codec is \"gzip\", not one of none, lz4, zstd"),
    "counts_dtype-unknown": (_set("int8", "counts_dtype"), "counts_dtype is \"int8\""),
    "indices_dtype-not-a-dtype": (_set("banana", "indices_dtype"), "indices_dtype"),
    "fingerprint-empty": (_set("", "fingerprint"), "fingerprint"),
    "shard-split-unknown": (_set("test", "shards", 0, "split"), r"shards\[0\].split"),
    "dataset-kind-unknown": (_set("spatial", "datasets", 0, "kind"), r"datasets\[0\].kind"),
    "dataset-report-a-list": (_set([], "datasets", 0, "report"), r"datasets\[0\].report"),
    "observable-strings": (_set(["a"], "datasets", 0, "observable"), r"datasets\[0\].observable"),
    "shard-path-outside": (_set("../elsewhere", "shards", 0, "path"), "not a path inside"),
    "shard-path-absolute": (_set("/tmp", "shards", 0, "path"), "not a path inside"),
    "vocab-file-outside": (_set("../vocab.tsv", "vocab", "file"), "vocab.file"),
    # per-gene arrays of another length than the vocabulary
    "gene_nnz-short": (_set(lambda v: v[:10], "gene_nnz"),
                       r"gene_nnz has 10 entries, the vocabulary \d+"),
    "gene_nnz-long": (_set(lambda v: v + [0], "gene_nnz"), "gene_nnz has"),
    "gene_frac_sum-short": (_set(lambda v: v[:-1], "gene_frac_sum"), "gene_frac_sum has"),
    "gene_obs_cells-long": (_set(lambda v: v + [1], "gene_obs_cells"), "gene_obs_cells has"),
    "gene_log1p_sum-empty": (_set([], "gene_log1p_sum"), "gene_log1p_sum has 0 entries"),
    "vocab-n_genes-wrong": (_set(lambda v: v + 1, "vocab", "n_genes"), "vocab.n_genes"),
    # negative counts and values out of range
    "n_train-negative": (_set(-5, "n_train"), "n_train is -5, not an integer >= 0"),
    "n_val-negative": (_set(-1, "n_val"), "n_val is -1"),
    "n_cells-negative": (_set(-1, "n_cells"), "n_cells is -1"),
    "shard-n_cells-negative": (_set(-1, "shards", 0, "n_cells"), r"shards\[0\].n_cells is -1"),
    "shard-nnz-negative": (_set(-3, "shards", 1, "nnz"), r"shards\[1\].nnz is -3"),
    "shard-offset-negative": (_set(-1, "shards", 0, "cell_offset"), r"cell_offset is -1"),
    "dataset-n_cells-negative": (_set(-2, "datasets", 1, "n_cells"), r"datasets\[1\].n_cells"),
    "seed-negative": (_set(-1, "seed"), "seed is -1"),
    "max_count-negative": (_set(-1, "max_count"), "max_count is -1"),
    "gene_nnz-negative": (_set(lambda v: v[:3] + [-1] + v[4:], "gene_nnz"),
                          r"gene_nnz\[3\] is -1; gene_nnz must hold integers >= 0"),
    "gene_frac_sum-nan": (_set(lambda v: [math.nan] + v[1:], "gene_frac_sum"),
                          r"gene_frac_sum\[0\] is nan; gene_frac_sum must hold finite "
                          r"numbers >= 0"),
    "gene_obs_cells-huge": (_set(lambda v: [2**70] + v[1:], "gene_obs_cells"), "out of range"),
    "stats_target_sum-0": (_set(0, "stats_target_sum"), "stats_target_sum"),
    "observable-beyond-vocabulary": (_set(lambda v: v + [10**6], "datasets", 0, "observable"),
                                     r"datasets\[0\].observable\[\d+\] is 1000000; "
                                     r".* must hold integers >= 0 and < \d+"),
    "observable-negative": (_set(lambda v: [-1] + v, "datasets", 0, "observable"),
                            r"datasets\[0\].observable\[0\] is -1"),
    # counts that disagree with each other
    "n_train-wrong": (_set(lambda v: v + 5, "n_train"), r"n_train is \d+, but the shards hold"),
    "n_cells-wrong": (_set(lambda v: v - 1, "n_cells"), "n_cells is"),
    "shard-offset-gap": (_set(lambda v: v + 1, "shards", 1, "cell_offset"),
                         r"shards\[1\].cell_offset is \d+, but the shards before it hold"),
    "val-shard-first": (lambda doc: {**doc, "shards": doc["shards"][::-1]},
                        "cell_offset|training shard after a validation shard"),
    "shard-listed-twice": (lambda doc: {**doc, "shards": doc["shards"] + doc["shards"][-1:]},
                           "listed twice|cell_offset"),
    "dataset-n_cells-wrong": (_set(lambda v: v + 7, "datasets", 0, "n_cells"),
                              "the datasets' n_cells add up to"),
    "dataset-name-twice": (lambda doc: doc["datasets"][1].update(name=doc["datasets"][0]["name"]),
                           "listed twice"),
    "gene_nnz-above-train-cells": (_set(lambda v: [10**6] + v[1:], "gene_nnz"),
                                   r"gene_nnz\[0\] is 1000000, more than the \d+ training cells"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_manifest_is_named(shards, tmp_path, case):
    change, named = CORRUPT[case]
    bad = _with_manifest(shards, tmp_path, change)
    with pytest.raises(ValueError) as info:
        Manifest.load(bad)
    msg = str(info.value)
    assert msg.startswith(f"{bad / 'manifest.json'}: corrupt manifest ("), msg
    assert msg.endswith("; re-run txfm data convert"), msg
    assert re.search(named, msg), (named, msg)


@pytest.mark.parametrize("change", [_set("other-format", "format"), _set(99, "version"),
                                    _drop("format")])
def test_other_format_or_newer_version_is_named(shards, tmp_path, change):
    bad = _with_manifest(shards, tmp_path, change)
    with pytest.raises(ValueError, match=r"manifest\.json: not a txfm-shards manifest of version"):
        Manifest.load(bad)


def test_user_examples_through_the_cli(shards, tmp_path, capsys, monkeypatch):
    """The users' examples: ``txfm data info`` and ``txfm train --data`` print one error line
    naming manifest.json (no KeyError/AttributeError traceback, no numpy broadcast error)."""
    from txfm.cli import main

    monkeypatch.chdir(tmp_path)
    examples = {"keyerror": lambda doc: {"format": "txfm-shards", "version": 2},
                "list": lambda doc: [1, 2, 3],
                "short": _set(lambda v: v[:10], "gene_nnz"),
                "negative": _set(-5, "n_train")}
    for i, (name, change) in enumerate(examples.items()):
        bad = _with_manifest(shards, tmp_path / name, change)
        for argv in (["data", "info", str(bad)],
                     ["train", "--data", str(bad), "--out", str(tmp_path / f"run{i}"), *TINY]):
            assert main(argv) == 2, argv
            out, err = capsys.readouterr()
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert "Traceback" not in out + err, err
            assert len(lines) == 1 and lines[0].startswith("error: "), err
            assert f"{bad / 'manifest.json'}: corrupt manifest (" in lines[0], lines[0]
            assert "re-run txfm data convert" in lines[0], lines[0]


def _no_newer_keys(doc):
    """A manifest as older txfm wrote it: format 1, none of the keys added since."""
    doc["version"] = 1
    for k in ("every_chunk_written", "gene_obs_cells", "gene_frac_sum", "gene_log1p_sum",
              "stats_target_sum"):
        del doc[k]


def _minimal(doc):
    """Only the keys Manifest.load reads (no version: read as format 1)."""
    keep = ("format", "vocab", "counts_dtype", "indices_dtype", "codec", "max_count",
            "integer_counts", "seed", "fingerprint", "shards", "datasets", "gene_nnz")
    doc = {k: doc[k] for k in keep}
    doc["vocab"] = {k: doc["vocab"][k] for k in ("file", "hash")}
    return doc


def test_valid_manifests_load_as_before(shards, tmp_path):
    m = Manifest.load(shards)
    assert m.version == 2 and m.every_chunk_written and m.gene_stats is not None
    assert m.gene_nnz.shape == (m.n_genes,) and m.n_split_cells("val") > 0
    for name, change in {"older": _no_newer_keys, "minimal": _minimal,
                         "extra-keys": _set(lambda v: {**v, "future": [1]}, "params"),
                         "unknown-top-key": lambda doc: {**doc, "added_later": {"x": 1}}}.items():
        old = Manifest.load(_with_manifest(shards, tmp_path / name, change))
        assert old.n_genes == m.n_genes and old.shards == m.shards
        assert np.array_equal(old.gene_nnz, m.gene_nnz)
        assert [d.name for d in old.datasets] == [d.name for d in m.datasets]
        assert all(np.array_equal(a.observable, b.observable)
                   for a, b in zip(old.datasets, m.datasets))
        assert (old.counts_dtype, old.indices_dtype, old.codec, old.max_count, old.seed) == \
            (m.counts_dtype, m.indices_dtype, m.codec, m.max_count, m.seed)
        if name in ("older", "minimal"):
            assert old.version == 1 and not old.every_chunk_written and old.gene_stats is None
            assert "format 1" in old.summary()


def test_collection_kinds(shards):
    """The fixture has what the checks look at: single-cell and bulk datasets, both splits."""
    m = Manifest.load(shards)
    assert {d.kind for d in m.datasets} == {"single-cell", "bulk"}
    assert {s.split for s in m.shards} == {"train", "val"}


# -- random: data specs -------------------------------------------------------------------------

BAD_SPECS = {
    "random:library=nan": "library must be a finite number > 0",
    "random:library=inf": "library must be a finite number > 0",
    "random:library=-3": "library must be a finite number > 0",
    "random:library=0": "library must be a finite number > 0",
    "random:library=1e30": "library must be a finite number > 0 (at most 1e7)",
    "random:library=lots": "library must be a finite number",
    "random:observed=0": "observed must be a finite number > 0 and <= 1",
    "random:observed=1.5": "observed must be",
    "random:observed=nan": "observed must be",
    "random:observed=-0.1": "observed must be",
    "random:cells=0": "cells must be an integer >= 1",
    "random:cells=-4": "cells must be an integer >= 1",
    "random:cells=many": "cells must be an integer >= 1",
    "random:cells=1.5": "cells must be an integer >= 1",
    "random:cells=1e3": "cells must be an integer >= 1",
    "random:genes=0": "genes must be an integer >= 1",
    "random:datasets=0": "datasets must be an integer >= 1",
    "random:types=0": "types must be an integer >= 1",
    "random:seed=-1": "seed must be an integer >= 0",
    "random:seed=x": "seed must be an integer >= 0",
    "random:cells=": "cells must be an integer >= 1 (no value given)",
    "random:cells": "cells must be an integer >= 1 (no value given)",
    "random:cells=64,cells=128": "cells is given twice",
    "random:cels=64": "unknown key 'cels'; valid keys: cells, genes, datasets, types, library, "
                      "observed, seed",
    "random:=5": "unknown key ''; valid keys: cells",
    "random:cells=64,genes=50,oops": "'oops' is not key=value; valid keys: cells",
    "randomly": "not a random data spec",
}


@pytest.mark.parametrize("spec", sorted(BAD_SPECS))
def test_bad_random_spec_names_data_and_key(spec):
    with pytest.raises(ValueError) as info:
        parse_random_spec(spec)
    msg = str(info.value)
    assert msg.startswith(f"--data {spec}: "), msg
    assert BAD_SPECS[spec] in msg, msg
    # the loader that training opens reports the same, before any numpy warning
    with pytest.raises(ValueError, match=f"^--data {spec}: "):
        open_loader(spec, "train", 8, seed=0, rank=0, world_size=1, pin_memory=False)


@pytest.mark.parametrize("spec", ["random:library=nan", "random:observed=0", "random:cells=0",
                                  "random:cels=64"])
def test_bad_random_spec_through_the_cli(spec, tmp_path, capsys, monkeypatch):
    from txfm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", spec, "--out", str(tmp_path / "run"), *TINY]) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in out + err and "lam value" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"error: --data {spec}: "), err
    key = spec.partition(":")[2].partition("=")[0]
    assert key in lines[0].partition(f"--data {spec}: ")[2], lines[0]
    assert "RandomCSRSource" not in lines[0], lines[0]


@pytest.mark.parametrize("spec, kwargs", [
    ("random", {}),
    ("random:", {}),
    ("random:cells=512,genes=300", {"n_cells": 512, "n_genes": 300}),
    ("random:cells=64,genes=40,datasets=3,types=2,library=500,observed=0.25,seed=7,",
     {"n_cells": 64, "n_genes": 40, "n_datasets": 3, "n_types": 2, "mean_library": 500.0,
      "observed_fraction": 0.25, "seed": 7}),
    ("random:observed=1,library=1e7,seed=0", {"observed_fraction": 1.0, "mean_library": 1e7,
                                             "seed": 0}),
])
def test_valid_random_specs(spec, kwargs):
    assert parse_random_spec(spec) == kwargs
    small = {"n_cells": 32, "n_genes": 20, **{k: v for k, v in kwargs.items()
                                              if k not in ("n_cells", "n_genes")}}
    src = RandomCSRSource(batch_size=8, **small)
    batches = list(src)
    assert len(batches) == 4 and all(b.counts.min() >= 0 for b in batches)


def test_small_observed_fraction_gives_every_dataset_a_gene():
    """observed=0.001 over 10 genes would leave datasets with no gene (a 0/0 rate)."""
    with np.errstate(all="raise"):
        src = RandomCSRSource(n_cells=64, n_genes=10, batch_size=8, n_datasets=6,
                              observed_fraction=0.001)
        batches = list(src)
    assert bool(src.observable.mask.any(1).all()) and len(batches) == 8


@pytest.mark.parametrize("kwargs, named", [
    ({"n_cells": 0}, "n_cells must be an integer >= 1, got 0"),
    ({"n_genes": -1}, "n_genes must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
    ({"n_datasets": 0}, "n_datasets must be an integer >= 1"),
    ({"n_types": True}, "n_types must be an integer >= 1"),
    ({"mean_library": float("nan")}, "mean_library must be a finite number > 0"),
    ({"mean_library": 0.0}, "mean_library must be a finite number > 0"),
    ({"observed_fraction": 0}, "observed_fraction must be a finite number > 0 and <= 1"),
    ({"observed_fraction": 2.0}, "observed_fraction must be"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"split": "test"}, "split='test'"),
])
def test_random_source_checks_its_arguments(kwargs, named):
    with pytest.raises(ValueError) as info:
        RandomCSRSource(**{"n_cells": 16, "n_genes": 8, **kwargs})
    assert named in str(info.value), str(info.value)
    assert "--data" not in str(info.value)


def test_random_source_accepts_numpy_integers():
    src = RandomCSRSource(np.int64(16), np.int32(8), batch_size=np.int64(4), seed=np.uint8(3),
                          mean_library=np.float32(100.0))
    assert len(list(src)) == 4
