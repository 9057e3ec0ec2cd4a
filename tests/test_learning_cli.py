"""``python -m txfm.eval.learning`` and the demo folder it builds: bad input is one ``error:``
line and exit 2 before any work, Ctrl-C is exit 130, a folder that is not ours is never
deleted, and a run folder is reused only when it is the run that was asked for.

The train / embed / eval steps are replaced by a fake ``_run`` that writes what they would
(checkpoints with the fields the command reads, the benchmark table), so nothing trains here.
"""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("anndata",
                    reason="txfm.data / txfm.eval need anndata: pip install anndata zarr")
pytest.importorskip("zarr", reason="txfm.data / txfm.eval need zarr: pip install anndata zarr")

import txfm.data.demo as demo
from txfm.eval import learning

RECIPE_STEPS = 3000  # the tiny recipe's, what the command asks for without --steps
SMALL = dict(cells=600, genes=150, perturbations=5, batches=2, bulk=5, seed=0)


def _checkpoint(run, step, steps, seed, k=16):
    """A checkpoint file with the fields the command reads (not a loadable model)."""
    import torch

    from txfm.train.checkpoint import FORMAT, checkpoint_path

    path = checkpoint_path(run, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "step": step, "train_config": {"steps": steps, "seed": seed},
                "model_config": {"k": k}}, path)


def _fake_demo(root):
    """The demo files the command reads, without generating the demo."""
    import h5py

    d = demo._paths(root)
    d.truth.mkdir(parents=True)
    (root / demo.MARKER).write_text(json.dumps({"synth": {}}))  # ours, as far as --root goes
    d.shards.mkdir()
    (d.truth / "params.json").write_text(json.dumps({"perturbations": 20}))
    (d.truth / "relationships.txt").write_text("entity1,entity2\nA,B\n")
    with h5py.File(d.raw / "screen.h5ad", "w") as f:
        f.create_group("X"), f.create_group("obs")
    return d


class Pipeline:
    """Fake train/embed/eval steps: records each call (with the thread settings it ran under)
    and writes their outputs."""

    def __init__(self, average=70.0, bmdb=float("nan")):
        self.calls, self.threads, self.average, self.bmdb = [], [], average, bmdb
        self.recall = {}  # (run, representation) -> recall of the planted gene pairs, in [0, 1]

    def __call__(self, argv):
        import torch

        self.calls.append(argv)
        self.threads.append((argv[0], torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")))
        arg = dict(zip(argv, argv[1:]))
        if argv[0] == "train":
            steps = int(arg.get("--steps", RECIPE_STEPS))
            _checkpoint(arg["--out"], steps, steps, int(arg.get("--seed", 0)))
        elif argv[0] in ("embed", "genes"):
            open(arg["--out"], "w").close()
        elif argv[:2] == ["eval", "relationships"]:
            import pandas as pd

            from txfm.eval.relationships import CODEBOOK_KEY, DECODER_KEY

            os.makedirs(arg["--out"], exist_ok=True)
            run = os.path.basename(arg["--out"])
            # the table names them by their genes.h5ad keys; learning.json by the bare names
            rows = [dict(representation=rep, n_components=c, database=db, primary=True,
                         recall_5_95_mean=self.recall.get((run, rep.removeprefix("X_")), 0.5))
                    for rep, c in ((CODEBOOK_KEY, 32), (DECODER_KEY, 64))
                    for db in ("relationships", "combined")]
            pd.DataFrame(rows).to_csv(os.path.join(arg["--out"], "relationships.csv"),
                                      index=False)
        elif argv[0] == "eval":
            import pandas as pd

            os.makedirs(arg["--out"], exist_ok=True)
            rows = [dict(embedding=e, postprocess="none", pcst=100.0, lin_top1=lin,
                         knn_top1=knn, bmdb=self.bmdb, average=a)
                    for e, a, lin, knn in (("X_txfm", self.average, 40.0, 30.0),
                                           ("pca", 65.0, 40.0, 30.0),
                                           ("X_untrained", 53.0, 30.0, 17.0))]
            pd.DataFrame(rows).to_csv(os.path.join(arg["--out"], "perturbation_all.csv"),
                                      index=False)

    def commands(self):
        return [c[0] for c in self.calls]


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """A fake demo under tmp/demo and a fake pipeline; ``fake.built`` lists ensure_demo calls."""
    d = _fake_demo(tmp_path / "demo")
    pipe = Pipeline()
    pipe.built = []

    def ensure(root, **kw):
        pipe.built.append(root)
        return d

    monkeypatch.setattr(demo, "ensure_demo", ensure)
    monkeypatch.setattr(learning, "_run", pipe)
    monkeypatch.chdir(tmp_path)
    return pipe


def _main(capsys, *argv):
    """(exit status, stdout, stderr) of the command; argparse's exits count as statuses."""
    try:
        code = learning.main(["--root", "demo", "--no-progress", *argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(("error:", "python -m txfm.eval.learning: error:")), err
    assert "Traceback" not in err
    return lines[-1]


# -- 1. a folder that is not ours is never deleted ---------------------------------------------

@pytest.mark.parametrize("sub", ["raw", "shards"])
def test_foreign_root_is_refused_not_deleted(tmp_path, capsys, monkeypatch, sub):
    root = tmp_path / "mine"
    (root / sub).mkdir(parents=True)
    (root / "notes.txt").write_text("my notes")
    (root / sub / "my_counts.h5ad").write_text("precious")
    with pytest.raises(demo.DemoFolderError, match="is not a txfm demo folder"):
        demo.ensure_demo(root)
    monkeypatch.setattr(learning, "_run", Pipeline())
    code, _, err = _main(capsys, "--root", str(root), "--out", str(tmp_path / "out"))
    assert code == 2
    assert _error_line(err) == (f"error: --root {root} exists and is not a txfm demo folder; "
                                "remove it or choose another location")
    assert (root / "notes.txt").read_text() == "my notes"
    assert (root / sub / "my_counts.h5ad").read_text() == "precious"
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_foreign_demo_folder(tmp_path, capsys, monkeypatch):
    """Plain `txfm train` builds ./txfm-demo: the same refusal, as an error line."""
    from txfm.cli import main

    (tmp_path / "txfm-demo" / "raw").mkdir(parents=True)
    (tmp_path / "txfm-demo" / "raw" / "mine.h5ad").write_text("precious")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "1", "--no-progress", "--out", "run"]) == 2
    assert _error_line(capsys.readouterr().err).endswith(
        "txfm-demo exists and is not a txfm demo folder; remove it or choose another location")
    assert (tmp_path / "txfm-demo" / "raw" / "mine.h5ad").read_text() == "precious"


@pytest.fixture()
def small_demo(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_SYNTH", SMALL)
    monkeypatch.setattr(demo, "DEMO_CONVERT", dict(min_cells=3, min_genes=10, val_fraction=0.05,
                                                   seed=0))


@pytest.mark.parametrize("lost", ["raw/truth/params.json", "raw/screen.h5ad",
                                  "raw/truth/relationships.txt", "shards/manifest.json"])
def test_demo_missing_a_file_is_rebuilt(tmp_path, small_demo, lost):
    """A demo of ours (it carries the marker) that lost a file is incomplete, and rebuilt."""
    root = tmp_path / "demo"
    demo.ensure_demo(root)
    assert demo._complete(root)
    (root / lost).unlink()
    (root / "extra.txt").write_text("inside our demo folder")
    assert not demo._complete(root)
    demo.ensure_demo(root)
    assert demo._complete(root) and (root / lost).is_file()


# -- 2. a run folder is reused only when it is the run asked for -------------------------------

def test_finished_run_is_reused_and_said(fake, tmp_path, capsys):
    _checkpoint(tmp_path / "out" / "run_txfm", 20, 20, 0)
    code, out, _ = _main(capsys, "--out", "out", "--steps", "20")
    assert code == 0
    trains = [c for c in fake.calls if c[0] == "train"]
    # only the untrained baseline trains (one step at its initial weights, no weight decay)
    assert len(trains) == 1 and trains[0][trains[0].index("--out") + 1] == "out/run_untrained"
    assert trains[0][trains[0].index("--steps") + 1] == "1" and "--weight-decay" in trains[0]
    assert "reusing out/run_txfm: finished (20 of 20 steps, seed 0)" in out
    fake.calls.clear()
    assert _main(capsys, "--out", "out", "--steps", "20")[0] == 0
    assert "train" not in fake.commands()  # the baseline is reused too


def test_the_untrained_baseline_is_the_initial_weights(tmp_path, small_demo):
    """Its one step ran at the schedule's peak rate (1e-3), not at the documented 4e-5, and
    moved the model off its initial weights; its checkpoint must hold the model as built."""
    from txfm.cli import main
    from txfm.train.checkpoint import latest_checkpoint
    from txfm.train.config import TrainConfig
    from txfm.train.trainer import Trainer

    shards = demo.ensure_demo(tmp_path / "demo", progress=False).shards
    run = tmp_path / "run"
    assert main(["train", "--data", str(shards), "--out", str(run), *learning.UNTRAINED_ARGS,
                 "--seed", "3", "--no-progress"]) == 0
    saved = latest_checkpoint(run)[1]
    rebuilt = {**saved["train_config"], "out": str(tmp_path / "rebuilt")}
    built = Trainer(TrainConfig.from_dict(rebuilt)).model.state_dict()
    assert saved["step"] == 1 and saved["model"].keys() == built.keys()
    for name, w in built.items():
        got = saved["model"][name]
        assert got.dtype == w.dtype and (got.double() - w.double()).abs().max() <= 1e-30, name
    for name, w in built.items():  # only weights that start at exactly 0 moved (by 1e-30)
        assert not w[saved["model"][name] != w].any(), name


def test_interrupted_run_is_resumed(fake, tmp_path, capsys):
    _checkpoint(tmp_path / "out" / "run_txfm", 40, 60, 3)
    code, out, _ = _main(capsys, "--out", "out", "--steps", "60", "--seed", "3")
    assert code == 0
    train = fake.calls[0]
    assert train[:2] == ["train", "--resume"] and train[train.index("--out") + 1] == "out/run_txfm"
    assert train[train.index("--steps") + 1] == "60" and train[train.index("--seed") + 1] == "3"
    assert "resuming out/run_txfm: stopped at step 40 of 60 (seed 3)" in out


@pytest.mark.parametrize("argv,variant", [(["--steps", "20"], "txfm"),
                                          (["--seed", "1"], "txfm"),
                                          ([], "txfm"),
                                          (["--variants", "relu"], "relu")])
def test_run_trained_with_other_settings_is_refused(fake, tmp_path, capsys, argv, variant):
    # without --steps the recipe's length is asked for; a 20-step run is not that
    done = 20 if argv == [] else RECIPE_STEPS
    _checkpoint(tmp_path / "out" / "run_txfm", done, done, 0)
    if variant != "txfm":
        _checkpoint(tmp_path / "out" / f"run_{variant}", 20, 20, 0)
    code, _, err = _main(capsys, "--out", "out", *argv)
    assert code == 2
    line = _error_line(err)
    assert line.startswith(f"error: --out out: out/run_{variant} was trained with --steps")
    assert "choose another --out or delete" in line
    assert fake.calls == [] and fake.built == []  # checked before the demo is built


def test_seed_reaches_every_training(fake, capsys):
    code, _, _ = _main(capsys, "--variants", "relu", "--seed", "7", "--steps", "5",
                       "--out", "out")
    assert code == 0
    trains = [c for c in fake.calls if c[0] == "train"]
    assert [t[t.index("--out") + 1] for t in trains] == ["out/run_txfm", "out/run_relu",
                                                         "out/run_untrained"]
    assert all(t[t.index("--seed") + 1] == "7" for t in trains)
    assert "--activation" in trains[1]
    # run again: both runs are complete for these settings, so nothing trains
    fake.calls.clear()
    assert _main(capsys, "--variants", "relu", "--seed", "7", "--steps", "5",
                 "--out", "out")[0] == 0
    assert "train" not in fake.commands()


def test_checkpoint_with_steps_or_seed_is_refused(fake, capsys):
    for extra in (["--steps", "5"], ["--seed", "1"]):
        code, _, err = _main(capsys, "--checkpoint", "somewhere", *extra)
        assert code == 2 and "--checkpoint: --steps and --seed would not apply" in \
            _error_line(err)
    code, _, err = _main(capsys, "--checkpoint", "nowhere", "--out", "out")
    assert code == 2 and _error_line(err).startswith("error: --checkpoint: checkpoint nowhere")
    assert fake.calls == [] and fake.built == []


# -- 3. numeric options are checked by the parser, before the demo ----------------------------

@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"], ["--seed", "-1"],
                                  ["--threads", "0"], ["--threads", "-2"],
                                  ["--variants", ","], ["--variants", ""]])
def test_bad_numbers_and_empty_variants_are_refused(fake, capsys, argv):
    code, _, err = _main(capsys, "--out", "out", *argv)
    assert code == 2
    assert argv[0] in _error_line(err)
    assert fake.calls == [] and fake.built == []


# -- 4. unusable paths, Ctrl-C, damaged demo --------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--out", "afile"], "error: --out afile: is a file"),
    (["--out", "afile/sub"], "error: --out afile/sub: afile is a file"),
    (["--out", "/proc/txfm-x"], "error: --out /proc/txfm-x: cannot write there (in /proc)"),
    (["--out", "out", "--root", "afile"], "error: --root afile: is a file"),
    (["--out", "out", "--root", "afile/sub"], "error: --root afile/sub: afile is a file"),
])
def test_unusable_out_or_root_is_an_error_line(fake, tmp_path, capsys, argv, message):
    if argv[1].startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    (tmp_path / "afile").write_text("")
    code, _, err = _main(capsys, *argv)
    assert code == 2
    assert _error_line(err).startswith(message)
    assert fake.calls == [] and fake.built == []
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("taken, kind", [("learning.json", "folder"), ("genes", "file"),
                                         ("perturbation/perturbation.csv", "folder"),
                                         ("screen_emb_txfm.h5ad", "folder")])
def test_a_name_the_command_writes_taken_by_the_other_kind_is_refused_first(
        fake, tmp_path, capsys, taken, kind):
    """``learning.json`` as a folder in --out trained every run and failed at the end."""
    path = tmp_path / "out" / taken
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if kind == "folder" else path.write_text("")
    code, _, err = _main(capsys, "--out", "out")
    assert code == 2
    assert _error_line(err).startswith(f"error: --out out: out/{taken} is a {kind}, where "
                                       f"the results go in a "
                                       f"{'file' if kind == 'folder' else 'folder'}")
    assert fake.calls == [] and fake.built == []


def _ctrl_c(*a, **k):
    raise KeyboardInterrupt


def _ctrl_c_a_library_turns_into_its_own_error(*a, **k):
    # as for txfm's own commands: pandas' C parser, say, catches the interrupt and raises an
    # error of its own, which must not be reported as the user's mistake (exit 2)
    import signal

    try:
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # Ctrl-C arrives in here
    except KeyboardInterrupt:
        raise ValueError("Calling read(nbytes) on source failed") from None


@pytest.mark.parametrize("interrupt", [_ctrl_c, _ctrl_c_a_library_turns_into_its_own_error])
def test_ctrl_c_while_the_demo_is_made(interrupt, tmp_path, capsys, monkeypatch):
    import signal

    monkeypatch.setattr("txfm.data.synth.generate", interrupt)
    monkeypatch.setattr(learning, "_run", Pipeline())
    monkeypatch.chdir(tmp_path)
    # as in a terminal: a test run in the background (nohup, CI) starts with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, _, err = _main(capsys, "--out", "out")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert not (tmp_path / "demo").exists() and not list(tmp_path.glob(".demo.tmp-*"))


def test_sigterm_while_the_demo_is_made(tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler's time limit) killed the command at once and left the half-made
    demo's temporary folder behind; it now stops as Ctrl-C does, with exit status 143."""
    import signal
    import time

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the command's handler raises here
        raise AssertionError("SIGTERM was not raised as an interrupt")

    monkeypatch.setattr("txfm.data.synth.generate", terminated)
    monkeypatch.setattr(learning, "_run", Pipeline())
    monkeypatch.chdir(tmp_path)
    # a handler of the caller's, which the command must replace while it runs and restore (and
    # without which a regression would kill the test session instead of failing this test)
    caller = []
    before = signal.signal(signal.SIGTERM, lambda *a: caller.append(a))
    try:
        code, _, err = _main(capsys, "--out", "out")
        assert signal.getsignal(signal.SIGTERM).__code__.co_filename == __file__  # restored
    finally:
        signal.signal(signal.SIGTERM, before)
    assert caller == [] and code == 143 and err.strip().splitlines()[-1] == "terminated"
    assert not (tmp_path / "demo").exists() and not list(tmp_path.glob(".demo.tmp-*"))


def test_unreadable_demo_file_is_named_before_training(fake, tmp_path, capsys):
    (tmp_path / "demo" / "raw" / "truth" / "params.json").write_text("{trunc")
    code, _, err = _main(capsys, "--out", "out")
    assert code == 2
    line = _error_line(err)
    assert "demo/raw/truth/params.json cannot be read" in line and "delete demo" in line
    assert "--input" not in line
    assert fake.calls == []


# -- 5. --threads and --no-progress reach every step ------------------------------------------

def test_threads_and_no_progress_reach_every_step(fake, capsys):
    import torch

    before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    want = 1 if before[0] != 1 else 2
    assert _main(capsys, "--out", "out", "--steps", "5", "--threads", str(want))[0] == 0
    for command, threads, env in fake.threads[:-1]:  # train and embed run in this process
        assert (threads, env) == (want, str(want)), command
    evaluation = fake.calls[-1]
    assert evaluation[:2] == ["eval", "perturbation"]
    assert evaluation[evaluation.index("--threads") + 1] == str(want)
    assert all("--no-progress" in c for c in fake.calls)
    assert (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")) == before


# -- 6. strict JSON ---------------------------------------------------------------------------

def test_learning_json_is_strict(fake, tmp_path, capsys):
    assert _main(capsys, "--out", "out", "--steps", "5")[0] == 0

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    doc = json.loads((tmp_path / "out" / "learning.json").read_text(),
                     parse_constant=no_constants)
    assert doc["best"][0]["bmdb"] is None
    assert not [p.name for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


# -- 7, 8. what the docs promise; exit statuses -----------------------------------------------

def test_docstring_names_the_files_written():
    doc = learning.__doc__
    assert "perturbation.md" not in doc
    for name in ("perturbation.csv", "perturbation_all.csv", "perturbation.png",
                 "learning.json"):
        assert name in doc


def test_exit_status_is_documented_and_returned(fake, capsys):
    code, help_text, _ = _main(capsys, "--help")
    assert code == 0
    help_text = " ".join(help_text.split())
    for status in ("0 when every check passes", "1 when a finished run's checks fail",
                   "2", "130", "143 when terminated"):
        assert status in help_text
    assert _main(capsys, "--out", "ok", "--steps", "5")[0] == 0
    fake.average = 10.0  # below PCA's: a check fails
    code, out, _ = _main(capsys, "--out", "failing", "--steps", "5")
    assert code == 1 and "average >= PCA's: NO" in out


def test_failed_step_status_is_returned(fake, capsys, monkeypatch):
    def embed_fails(argv):
        fake(argv)
        if argv[0] == "embed":
            raise SystemExit(2)  # what _run does after the step printed its error line

    monkeypatch.setattr(learning, "_run", embed_fails)
    assert learning.main(["--root", "demo", "--out", "out", "--steps", "5"]) == 2
    assert not (fake.calls and (fake.calls[-1][0] == "eval"))


def test_model_no_better_than_untrained_fails_the_check(fake, capsys, monkeypatch):
    """A model that beats chance but not its own initial weights has not shown that it
    learned (on the demo a random encoder reaches lin top-1 ~30, 6x chance)."""
    def same_as_untrained(argv):
        fake(argv)
        if argv[:2] == ["eval", "perturbation"]:
            import pandas as pd

            path = os.path.join(dict(zip(argv, argv[1:]))["--out"], "perturbation_all.csv")
            table = pd.read_csv(path)
            table.loc[table.embedding == "X_untrained", ["lin_top1", "knn_top1"]] = (38.5, 29.0)
            table.to_csv(path, index=False)

    monkeypatch.setattr(learning, "_run", same_as_untrained)
    code, out, _ = _main(capsys, "--out", "out")
    assert code == 1  # ahead by 1.5 and 1.0 points: within noise (a 20-step model is that far)
    assert "X_txfm lin_top1 >= the untrained model's + 2 (40.5): NO" in out
    assert "X_txfm knn_top1 >= the untrained model's + 2 (31.0): NO" in out


# -- 9. Table 5's gene columns ------------------------------------------------------------------

def test_gene_recall_of_every_run_is_printed_and_saved(fake, tmp_path, capsys):
    """Each run's codebook and decoder are scored on the demo's planted relationships (the
    paper's Table 5 "enc" / "dec"), printed beside the perturbation scores and saved."""
    fake.recall = {("txfm", "codebook"): 0.645, ("txfm", "decoder"): 0.777,
                   ("untrained", "decoder"): 0.1}
    code, out, _ = _main(capsys, "--out", "out", "--steps", "5", "--threads", "1")
    assert code == 0
    relationships = [c for c in fake.calls if c[:2] == ["eval", "relationships"]]
    assert [c[c.index("--out") + 1].split(os.sep)[-1] for c in relationships] == \
        ["txfm", "untrained"]
    for c in relationships:
        assert c[c.index("--db") + 1].endswith("relationships.txt")
        assert c[c.index("--threads") + 1] == "1" and "--no-progress" in c
    assert "Table 5" in out and "random 10" in out
    assert "| txfm | 70.0 | 40.0 | 30.0 | 64.5 | 77.7 |" in out
    assert "| untrained | 53.0 | 30.0 | 17.0 | 50.0 | 10.0 |" in out
    doc = json.loads((tmp_path / "out" / "learning.json").read_text())
    assert doc["gene_recall"]["txfm"] == pytest.approx({"codebook": 64.5, "decoder": 77.7})
    assert doc["gene_recall_random"] == 10


# -- 10. Table 5 over seeds (--summarize) -------------------------------------------------------

def _finished_run(folder, rows, recall=None):
    """A finished run's benchmark table (``rows``: (embedding, postprocess, average, pcst,
    lin_top1, knn_top1)) and gene recall, as the command leaves them."""
    import pandas as pd

    (folder / "perturbation").mkdir(parents=True)
    pd.DataFrame(rows, columns=["embedding", "postprocess", "average", "pcst", "lin_top1",
                                "knn_top1"]).to_csv(folder / "perturbation" /
                                                    "perturbation_all.csv", index=False)
    if recall is not None:
        (folder / "learning.json").write_text(json.dumps({"gene_recall": recall}))


def test_summarize_pairs_the_runs_and_saves_the_table(fake, tmp_path, capsys):
    """Mean ± sd over the runs and the paired difference txfm - variant (mean, standard error,
    runs ahead), on each embedding's best post-processing and on each one held fixed; the
    numbers are worked out by hand below."""
    import pandas as pd

    # (average, pcst, lin_top1, knn_top1) of txfm center, txfm tvn, relu center, relu tvn:
    # txfm's best rows are tvn, center, tvn; relu's center, tvn, center
    runs = {"s0": [(54.0, 80, 30, 20), (55.0, 85, 31, 25), (54.5, 85, 30, 22), (54.0, 85, 30, 24)],
            "s1": [(56.0, 85, 32, 22), (55.5, 85, 33, 26), (55.0, 80, 31, 23), (57.0, 90, 31, 27)],
            "s2": [(53.0, 80, 30, 21), (54.0, 80, 31, 24), (53.5, 80, 30, 20), (52.0, 75, 29, 25)]}
    recall = {"s0": {"txfm": {"codebook": 50.0, "decoder": 70.0},
                     "relu": {"codebook": 48.0, "decoder": 71.0}},
              "s1": {"txfm": {"codebook": 52.0, "decoder": 69.0},
                     "relu": {"codebook": 53.0, "decoder": 68.0}}}
    labels = [("X_txfm", "center"), ("X_txfm", "tvn"), ("X_relu", "center"), ("X_relu", "tvn")]
    pca = [("pca", "center", 53.0, 90, 28, 12), ("pca", "tvn", 50.0, 90, 26, 12)]
    for name, scores in runs.items():
        _finished_run(tmp_path / name, [(*lab, *sc) for lab, sc in zip(labels, scores)] + pca,
                      recall.get(name))
    code, out, _ = _main(capsys, "--summarize", "s0", "s1", "s2", "--out", "summary")
    assert code == 0
    table = pd.read_csv(tmp_path / "summary" / "table5_seeds.csv")

    def row(variant, rows, metric):
        r = table[(table.variant == variant) & (table.rows == rows) & (table.metric == metric)]
        assert len(r) == 1, (variant, rows, metric)
        return r.iloc[0]

    # best average: txfm 55.0, 56.0, 54.0; relu 54.5, 57.0, 53.5 -> differences 0.5, -1.0, 0.5
    best = row("relu", "best", "average")
    assert (best.n, best.ahead, best.paired) == (3, 2, 3)
    assert best["mean"] == pytest.approx(55.0) and best.sd == pytest.approx(1.8027756, rel=1e-6)
    assert best["diff"] == pytest.approx(0.0) and best.diff_se == pytest.approx(0.5)
    # the best rows carry their own p.cst: txfm 85, 85, 80 against relu 85, 90, 80
    assert row("relu", "best", "pcst")["diff"] == pytest.approx(-5 / 3)
    # tvn held fixed: txfm 55.0, 55.5, 54.0 against relu 54.0, 57.0, 52.0 -> 1.0, -1.5, 2.0
    tvn = row("relu", "tvn", "average")
    assert tvn["diff"] == pytest.approx(0.5) and tvn.ahead == 2
    assert tvn.diff_se == pytest.approx(1.8027756 / 3 ** 0.5, rel=1e-6)
    assert row("pca", "center", "knn_top1")["diff"] == pytest.approx(9.0)
    # gene recall where a run saved it (s2 has no learning.json): 2 pairs
    enc = row("relu", "genes", "enc")
    assert (enc.n, enc.paired) == (2, 2) and enc["diff"] == pytest.approx(0.5)
    assert row("txfm", "genes", "dec")["mean"] == pytest.approx(69.5)
    assert "| relu | 55.00 ± 1.80 | +0.00 (0.50) | 2/3 | -1.67 (1.67) |" in out
    assert "tvn held fixed:" in out and "gene recall of the planted programs" in out
    assert fake.calls == [] and fake.built == []  # nothing trained, no demo made

    # the real command under ``| head``: the table is saved first, then it stops quietly
    from _launch import reader_gone

    from txfm.cli import CLOSED_PIPE_STATUS

    assert reader_gone(["-m", "txfm.eval.learning", "--summarize", "s0", "s1", "s2", "--out",
                        "piped"], cwd=tmp_path) == (CLOSED_PIPE_STATUS, "")
    assert (tmp_path / "piped" / "table5_seeds.csv").read_text() == (
        tmp_path / "summary" / "table5_seeds.csv").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--summarize", "s0", "missing"], "error: --summarize missing: no perturbation"),
    (["--summarize", "s0", "nodefault"], "error: --summarize nodefault: perturbation_all.csv "
                                         "has no X_txfm rows"),
    (["--summarize", "s0", "empty"], "error: --summarize empty: "),
    (["--summarize", "s0", "badjson"], "error: --summarize badjson: "),
    (["--summarize", "s0", "listjson"], "error: --summarize listjson: "),
    (["--summarize", "s0", "textjson"], "gene_recall.txfm.codebook is 'abc', not a number"),
    (["--summarize", "s0", "noname"], "error: --summarize noname: perturbation_all.csv has rows "
                                      "without an embedding"),
    (["--summarize", "s0", "text"], "error: --summarize text: perturbation_all.csv holds text"),
    (["--summarize", "s0"], "--summarize: give at least two --out folders"),
    (["--summarize", "s0", "s0", "--seed", "1"], "--summarize reads finished runs and trains "
                                                 "nothing: leave out --seed"),
    (["--summarize", "s0", "s0", "--ablation"], "leave out --ablation"),
    (["--summarize", "s0", "s0", "--out", "afile"], "error: --out afile: is a file"),
])
def test_summarize_refuses_what_it_cannot_read(fake, tmp_path, capsys, argv, message):
    _finished_run(tmp_path / "s0", [("X_txfm", "tvn", 55.0, 85, 31, 25)])
    _finished_run(tmp_path / "nodefault", [("pca", "tvn", 50.0, 90, 26, 12)])
    (tmp_path / "empty" / "perturbation").mkdir(parents=True)
    (tmp_path / "empty" / "perturbation" / "perturbation_all.csv").write_text("")
    _finished_run(tmp_path / "badjson", [("X_txfm", "tvn", 55.0, 85, 31, 25)])
    (tmp_path / "badjson" / "learning.json").write_text("{not json")
    _finished_run(tmp_path / "listjson", [("X_txfm", "tvn", 55.0, 85, 31, 25)], [1, 2])
    _finished_run(tmp_path / "textjson", [("X_txfm", "tvn", 55.0, 85, 31, 25)],
                  {"txfm": {"codebook": "abc"}})
    _finished_run(tmp_path / "noname", [("X_txfm", "tvn", 55.0, 85, 31, 25),
                                        (None, "tvn", 50.0, 80, 30, 20)])
    _finished_run(tmp_path / "text", [("X_txfm", "tvn", "high", 85, 31, 25)])
    (tmp_path / "afile").write_text("")
    code, _, err = _main(capsys, *argv)
    assert code == 2 and message in _error_line(err)
    assert fake.calls == [] and fake.built == []
