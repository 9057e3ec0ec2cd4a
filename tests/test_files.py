"""``txfm.files``: the one atomic writer every command uses, and the undo of made folders."""
from __future__ import annotations

import numpy as np
import pytest

from txfm.files import missing_folders, remove_made_folders, write_atomic


@pytest.mark.parametrize("durable", [False, True])
def test_writers_that_choose_the_format_by_the_suffix_write_the_file_itself(tmp_path, durable):
    # np.savez adds ".npz" to a name without it: the temporary name must keep the suffix
    path = tmp_path / "stats.npz"
    write_atomic(path, lambda tmp: np.savez(tmp, a=np.arange(3)), durable=durable)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["a"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]


def test_a_failed_rename_leaves_no_temporary_file(tmp_path):
    # the write succeeds and the rename fails (a folder holds the name): the caller gets the
    # error and nothing is left behind (a failed write: tests/test_bench_cli.py)
    (tmp_path / "table.csv").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "table.csv", lambda tmp: tmp.write_text("new"), durable=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    assert (tmp_path / "table.csv").is_dir()


def test_made_folders_are_taken_back_unless_another_writer_filled_them(tmp_path):
    made = missing_folders(tmp_path / "a" / "b" / "c")
    assert made == [tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a"]
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "other.txt").write_text("kept")
    remove_made_folders(made)
    assert not (tmp_path / "a" / "b").exists() and (tmp_path / "a" / "other.txt").exists()


@pytest.mark.parametrize("name", ["manifest.json", "zarr.json", "loss.png", "metrics", "a.b.json"])
def test_a_temporary_file_names_the_file_it_was_to_become(tmp_path, name):
    # what a folder's owner reads to know a killed writer's leftover for its own
    from txfm.files import atomic_target

    seen = []
    write_atomic(tmp_path / name, lambda tmp: seen.append(tmp.name) or tmp.write_text("x"))
    assert atomic_target(seen[0]) == name
    assert atomic_target(name) is None and atomic_target(".tmp-dataset_0-12") is None


def test_staged_outputs_moves_every_file_or_none(tmp_path):
    """``txfm eval``'s result files: a folder under one of their names stopped the moves
    half-way (the files before it moved, a mix of two runs'); now none moves."""
    from txfm.eval.io import staged_outputs

    out = tmp_path / "o"
    (out / "b.csv").mkdir(parents=True)
    (out / "a.csv").write_text("last run")
    with pytest.raises(IsADirectoryError, match=r"b\.csv is a folder"):
        with staged_outputs(out) as tmp:
            (tmp / "a.csv").write_text("this run")
            (tmp / "b.csv").write_text("this run")
    assert (out / "a.csv").read_text() == "last run"
    assert sorted(p.name for p in out.iterdir()) == ["a.csv", "b.csv"]
