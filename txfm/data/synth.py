"""Synthetic raw-count data with known biology: the project's embedded default data set.

``generate(out_dir)`` writes one ``.h5ad`` per dataset (raw integer counts in ``X`` as CSR,
written chunk by chunk, so the size is limited by disk, not memory) and the ground truth in
``out_dir/truth/``.

Model. Gene ``g`` has a base log-abundance ``b_g ~ N(-1, 1.6)`` (skewed means: a few genes
dominate the library), an NB inverse dispersion ``theta_g`` and possibly membership in one
*gene program* ``p`` with loading ``w_g``. A cell's program activities are
``a_p = A[type, p] + shift_p(perturbation) + eps_p`` (``eps ~ N(0, 0.5^2)`` per cell, which
makes the genes of one program co-vary within every cell type), and its expected counts are

    mu_cg = L_c * softmax_g(b_g + beta_{batch, g} + w_g * a_{c, p(g)} - kd_c * [g = target_c])

with a log-normal library size ``L_c`` (times a per-batch depth factor ``exp(N(0, 0.3^2))``)
and gene-wise batch shifts ``beta ~ N(0, 0.25^2)`` (both sds: ``batch_effect``). Counts are
negative binomial: ``Poisson(mu * Gamma(theta, 1/theta))``.

Datasets (each profiles a different, overlapping gene subset, so observable-gene handling is
exercised):

* ``screen`` (about 65% of ``cells``): a CRISPRi-like single-cell screen of ``perturbations``
  target genes drawn from program genes plus ~12% ``non-targeting`` controls, two cell
  states, ``batches`` batches. A perturbation knocks its target down by ``exp(-kd)`` and
  shifts the activity of the target's program (so the whole program moves).
* ``atlas``: unperturbed single cells of all cell types (``perturbation = "none"``).
* ``bulk`` (when ``bulk > 0``): deep bulk samples mixing cell types; counts exceed 65,535
  for top genes, exercising the converter's wider count dtype.

Ground truth (``truth/``): ``gene_programs.tsv`` (gene -> program, loading, base
abundance), ``relationships.txt`` (all within-program gene pairs as ``entity1,entity2``
symbols, the EFAAR benchmark's CSV format), ``perturbation_effects.tsv`` (target ->
program, knockdown, program shift), ``cell_types.tsv`` (program activities per type) and
``params.json`` (the parameters, the counts made and ``convert_filters``: converter filters
that keep >= 95% of each single-cell dataset's cells).

The set is built in a hidden sibling folder and renamed to ``out_dir`` when complete: an
interrupted or failed call leaves ``out_dir`` as it was, and a rerun replaces an earlier output
as a whole (:func:`generate`, :func:`output_problem`).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from txfm.files import missing_folders, remove_made_folders


@dataclass(frozen=True)
class SynthResult:
    out_dir: Path
    datasets: tuple[Path, ...]  # .h5ad files, in the order to give them to the converter
    truth_dir: Path
    programs: Path  # truth/gene_programs.tsv
    relationships: Path  # truth/relationships.txt (entity1,entity2)
    perturbations: Path  # truth/perturbation_effects.tsv
    params: Path  # truth/params.json
    # filters under which `txfm data convert` keeps >= 95% of each single-cell dataset's cells
    min_cells: int = 20
    min_genes: int = 100


def gene_ids(n: int) -> np.ndarray:
    """Synthetic Ensembl-style ids (``ENSG9`` + 10 digits: never a real Ensembl id)."""
    return np.array([f"ENSG9{i:010d}" for i in range(n)], dtype=object)


def gene_symbols(n: int) -> np.ndarray:
    return np.array([f"SYN{i + 1:05d}" for i in range(n)], dtype=object)


# Share of the genes that belong to some program; the rest are background genes.
_PROGRAM_SHARE = 0.45


def _program_budget(genes: int) -> int:
    return int(_PROGRAM_SHARE * genes)


def default_programs(genes: int) -> int:
    """The programs asked for when ``programs`` is not given: ``genes // 75``, at least 6 (as
    many of them as fit in the program genes, 45% of ``genes``, are made)."""
    return max(6, genes // 75)


def max_programs(genes: int, program_size: tuple[int, int] = (10, 40)) -> int:
    """The most programs of at least ``program_size[0]`` genes that fit in the 45% of
    ``genes`` given to programs: the largest ``programs`` :func:`generate` accepts."""
    return _program_budget(genes) // program_size[0]


class _Model:
    """Gene-level and cell-type-level parameters shared by all datasets.

    ``exact``: make exactly ``n_programs`` programs (the caller checked that they fit, see
    :func:`max_programs`); otherwise as many of them as fit in the program genes' budget.
    """

    def __init__(self, rng: np.random.Generator, genes: int, n_programs: int, n_types: int,
                 program_size: tuple[int, int] = (10, 40), exact: bool = False):
        self.G = genes
        self.base = rng.normal(-1.0, 1.6, genes)
        self.theta = np.exp(rng.normal(np.log(3.0), 0.6, genes))
        order = rng.permutation(genes)
        state = rng.bit_generator.state
        n_made = self._pack(rng, order, n_programs, program_size, reserve=False)
        if exact and n_made < n_programs:
            # Drawn sizes that overflow the budget would drop the last programs: draw again,
            # leaving each later program its minimum. Only then, so that every request the
            # plain draw honours (the default included) keeps its data for a seed.
            rng.bit_generator.state = state
            n_made = self._pack(rng, order, n_programs, program_size, reserve=True)
        n_programs = n_made
        self.n_programs = n_programs
        # dense [P, G] loading matrix: programs are few, so this stays small
        self.W = np.zeros((n_programs, genes))
        members = np.flatnonzero(self.program >= 0)
        self.W[self.program[members], members] = self.loading[members]
        on = rng.random((n_types, n_programs)) < 0.45
        self.type_act = np.where(on, rng.normal(0.0, 1.3, (n_types, n_programs)), 0.0)

    def _pack(self, rng: np.random.Generator, order: np.ndarray, n_programs: int,
              program_size: tuple[int, int], reserve: bool) -> int:
        """Draw program sizes in ``program_size`` and loadings within the budget of program
        genes (:func:`_program_budget`) and return how many programs fit; with ``reserve``
        all do (each later program keeps at least ``program_size[0]`` genes)."""
        self.program = np.full(self.G, -1, dtype=np.int64)
        self.loading = np.zeros(self.G)
        budget = _program_budget(self.G)
        pos = 0
        for p in range(n_programs):
            size = int(rng.integers(program_size[0], program_size[1] + 1))
            later = (n_programs - p - 1) * program_size[0] if reserve else 0
            size = min(size, budget - pos - later)
            if size < 3:
                return p
            members = order[pos:pos + size]
            self.program[members] = p
            self.loading[members] = rng.uniform(0.5, 1.2, size)
            pos += size
        return n_programs

    def expected(self, act: np.ndarray, batch_shift: np.ndarray, depth: np.ndarray,
                 kd_gene: np.ndarray | None = None, kd: np.ndarray | None = None) -> np.ndarray:
        """``mu [n, G]`` for program activities ``act [n, P]``, batch shifts ``[n, G]``,
        library sizes ``depth [n]`` and an optional knockdown of gene ``kd_gene[c]`` (-1: none)."""
        logit = self.base[None, :] + batch_shift + act @ self.W
        if kd_gene is not None:
            rows = np.flatnonzero(kd_gene >= 0)
            logit[rows, kd_gene[rows]] -= kd[rows]
        logit -= logit.max(axis=1, keepdims=True)
        np.exp(logit, out=logit)
        logit *= (depth / logit.sum(axis=1))[:, None]
        return logit


def _nb(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    shape = np.broadcast_to(theta.astype(np.float32), mu.shape)
    gamma = rng.standard_gamma(shape, dtype=np.float32)
    lam = mu * (gamma / theta.astype(np.float32))
    return rng.poisson(lam)


_INT32_MAX = int(np.iinfo(np.int32).max)
# What the written .h5ad files look like; 2: indptr and indices share one dtype (1 mixed
# int64 indptr with int32 indices). txfm.data.demo rebuilds a demo written in another.
H5AD_LAYOUT = 2


class _H5adWriter:
    """Writes an ``.h5ad`` with CSR ``X`` appended chunk by chunk (bounded memory).

    ``indptr`` and ``indices`` get one dtype: int32 while the non-zeros fit, else both int64.
    scipy keeps the dtypes anndata reads, and a CSR with mixed ones fails in ``tocoo``,
    ``multiply`` and so in scanpy's ``normalize_total``.
    """

    def __init__(self, path: Path, n_cols: int, data_dtype=np.int32):
        import h5py

        self.path = path
        self.f = h5py.File(path, "w")
        self.f.attrs["encoding-type"] = "anndata"
        self.f.attrs["encoding-version"] = "0.1.0"
        x = self.f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        self.x = x
        self.n_cols = n_cols
        kw = dict(shape=(0,), maxshape=(None,), chunks=(1 << 16,))
        self.data = x.create_dataset("data", dtype=data_dtype, **kw)
        self.indices = x.create_dataset("indices", dtype=np.int32, **kw)
        self.indptr = [np.zeros(1, dtype=np.int64)]
        self.nnz = 0

    def append(self, counts: np.ndarray) -> None:
        """Append dense ``[rows, n_cols]`` counts."""
        import scipy.sparse as sp

        m = sp.csr_matrix(counts.astype(np.int32, copy=False))
        self.append_csr(m.indptr, m.indices, m.data)

    def append_csr(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        n = int(indptr[-1])
        for ds, values in ((self.data, data), (self.indices, indices)):
            ds.resize((self.nnz + n,))
            ds[self.nnz:self.nnz + n] = values
        self.indptr.append(np.asarray(indptr[1:], dtype=np.int64) + self.nnz)
        self.nnz += n

    def _widen_indices(self, chunk: int = 1 << 24) -> None:
        """Rewrite ``indices`` as int64, a chunk at a time (more than 2^31 - 1 non-zeros)."""
        wide = self.x.create_dataset("indices_int64", shape=(self.nnz,), maxshape=(None,),
                                     dtype=np.int64, chunks=(1 << 16,))
        for a in range(0, self.nnz, chunk):
            wide[a:a + chunk] = self.indices[a:a + chunk]
        del self.x["indices"]
        self.x.move("indices_int64", "indices")
        self.indices = wide

    def finish(self, obs: pd.DataFrame, var: pd.DataFrame, uns: dict) -> None:
        import anndata as ad

        indptr = np.concatenate(self.indptr)
        if self.nnz <= _INT32_MAX:
            indptr = indptr.astype(np.int32)
        else:
            self._widen_indices()
        self.x.create_dataset("indptr", data=indptr)
        self.x.attrs["shape"] = np.array([indptr.size - 1, self.n_cols], dtype=np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad.io.write_elem(self.f, "obs", obs)
            ad.io.write_elem(self.f, "var", var)
            ad.io.write_elem(self.f, "uns", uns)
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                ad.io.write_elem(self.f, key, {})
        self.f.close()

    def close(self) -> None:
        """Close the file, finished or not (the caller removes an unfinished one)."""
        if self.f.id.valid:
            self.f.close()


def _write_dataset(path: Path, model: _Model, rng: np.random.Generator, *, observed: np.ndarray,
                   types: np.ndarray, batch: np.ndarray, n_batches: int, depth_median: float,
                   depth_sigma: float, perturb_gene: np.ndarray, perturb_label: np.ndarray,
                   kd: np.ndarray, shift_prog: np.ndarray, shift: np.ndarray,
                   mix: np.ndarray | None,
                   noise: float, theta_scale: float, name: str, kind: str, chunk: int,
                   type_names: list[str], batch_names: list[str],
                   batch_effect: tuple[float, float]) -> np.ndarray:
    """Write one dataset; returns the number of cells expressing each of its genes
    (``int64 [observed.size]``), for :func:`_convert_filters`."""
    n = types.size
    G = model.G
    batch_shift = rng.normal(0.0, batch_effect[0], (n_batches, G))
    batch_depth = np.exp(rng.normal(0.0, batch_effect[1], n_batches))
    depth = np.exp(rng.normal(np.log(depth_median), depth_sigma, n)) * batch_depth[batch]
    w = _H5adWriter(path, observed.size)
    try:
        gene_cells = _write_counts(w, model, rng, observed=observed, types=types, batch=batch,
                                   depth=depth, perturb_gene=perturb_gene, kd=kd,
                                   shift_prog=shift_prog, shift=shift, mix=mix, noise=noise,
                                   theta=model.theta * theta_scale, batch_shift=batch_shift,
                                   chunk=chunk)
        obs = pd.DataFrame({
            "cell_type": pd.Categorical(np.asarray(type_names, dtype=object)[types]),
            "perturbation": pd.Categorical(perturb_label),
            "batch": pd.Categorical(np.asarray(batch_names, dtype=object)[batch]),
            "dataset": pd.Categorical([name] * n),
        }, index=pd.Index([f"{name}_{i:07d}" for i in range(n)]))
        ids, syms = gene_ids(G), gene_symbols(G)
        var = pd.DataFrame({"symbol": syms[observed].astype(str)},
                           index=pd.Index(ids[observed].astype(str)))
        w.finish(obs, var, {"modality": kind, "txfm_synthetic": "txfm.data.synth"})
    finally:
        w.close()
    return gene_cells


def _write_counts(w: _H5adWriter, model: _Model, rng: np.random.Generator, *,
                  observed: np.ndarray, types: np.ndarray, batch: np.ndarray, depth: np.ndarray,
                  perturb_gene: np.ndarray, kd: np.ndarray, shift_prog: np.ndarray,
                  shift: np.ndarray, mix: np.ndarray | None, noise: float, theta: np.ndarray,
                  batch_shift: np.ndarray, chunk: int) -> np.ndarray:
    n = types.size
    gene_cells = np.zeros(observed.size, dtype=np.int64)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        if mix is None:
            act = model.type_act[types[a:b]].copy()
        else:
            act = mix[a:b] @ model.type_act
        act += rng.normal(0.0, noise, act.shape)
        rows = np.flatnonzero(shift_prog[a:b] >= 0)
        act[rows, shift_prog[a:b][rows]] += shift[a:b][rows]
        mu = model.expected(act, batch_shift[batch[a:b]], depth[a:b], perturb_gene[a:b], kd[a:b])
        counts = _nb(rng, mu[:, observed], theta[observed])
        gene_cells += np.count_nonzero(counts, axis=0)
        w.append(counts)
    return gene_cells


def generate(out_dir, *, cells: int = 20_000, genes: int = 3_000, perturbations: int = 50,
             batches: int = 3, bulk: int = 0, programs: int | None = None, cell_types: int = 8,
             seed: int = 0, chunk_cells: int | None = None, depth: float = 4000.0,
             program_size: tuple[int, int] = (10, 40), shift: tuple[float, float] = (0.8, 1.6),
             distinct_programs: bool = False,
             batch_effect: tuple[float, float] = (0.25, 0.3),
             exact_programs: bool = True) -> SynthResult:
    """Write the synthetic datasets and their ground truth into ``out_dir`` (see module doc).

    ``cells`` single cells in total (screen + atlas), ``genes`` in the universe,
    ``perturbations`` CRISPRi targets, ``batches`` per single-cell dataset, ``bulk`` bulk
    samples (0: no bulk dataset). Deterministic for a given ``seed``.

    ``depth``: median UMIs per screen cell (atlas cells: 0.75x). ``program_size``: inclusive
    range of genes per program. ``shift``: range of a perturbation's program shift (its sign is
    random). ``distinct_programs``: each perturbation targets a gene of its own program (at
    most one target per program), so every perturbation has a distinguishable signature; by
    default targets are drawn among all program genes and several may share a program.
    ``batch_effect``: ``(sd of the gene-wise log shifts beta, sd of the log depth factor)`` of
    each batch of a dataset.

    ``programs``: gene programs to make, at most :func:`max_programs` ``(genes,
    program_size)``; by default :func:`default_programs` ``(genes)``, of which as many are made
    as fit (``truth/params.json`` records the count). ``exact_programs=False`` makes as many of
    an explicit ``programs`` as the sizes first drawn fit, as every call did before exact counts
    (2026-12-01): the demo keeps it, so that its data, and the numbers measured on them, stay
    the same for its seed.

    The output is built in a hidden temporary folder next to ``out_dir`` and renamed to it only
    when complete, so ``out_dir`` never holds a partial or mixed set: after an error, Ctrl-C or
    SIGTERM it is as it was. An empty or absent ``out_dir`` is filled; one that holds an
    earlier output of this function (and nothing else) is replaced as a whole; any other
    non-empty folder is refused (:func:`output_problem`).

    Returns:
        :class:`SynthResult`, its paths under ``out_dir`` as given.

    Raises:
        ValueError: a size out of range, a bad ``batch_effect`` or ``program_size``, more
            ``programs`` than fit, more ``perturbations`` than this universe has program genes
            (with ``distinct_programs``: programs) to target, or an ``out_dir`` that cannot
            take the output; nothing is written then.
        OSError: writing failed (disk full, say); ``out_dir`` is left as it was.
    """
    if cells < 20 or genes < 50:
        raise ValueError(f"need cells >= 20 and genes >= 50, got cells={cells}, genes={genes}")
    if batches < 1 or perturbations < 1 or cell_types < 2 or bulk < 0:
        raise ValueError("batches >= 1, perturbations >= 1, cell_types >= 2, bulk >= 0 required")
    if len(batch_effect) != 2 or not all(np.isfinite(v) and v >= 0 for v in batch_effect):
        raise ValueError(f"batch_effect must be two finite standard deviations >= 0 "
                         f"(gene shift, log depth), got {batch_effect!r}")
    program_size = tuple(int(v) for v in program_size)
    if len(program_size) != 2 or not 3 <= program_size[0] <= program_size[1]:
        raise ValueError(f"program_size must be (low, high) with 3 <= low <= high, got "
                         f"{program_size!r}")
    if programs is not None:
        most = max_programs(genes, program_size)
        if programs < 1:
            raise ValueError(f"programs must be >= 1 (or None for the default), got {programs}")
        if programs > most:
            need = int(np.ceil(programs * program_size[0] / _PROGRAM_SHARE))
            while max_programs(need, program_size) < programs:
                need += 1
            raise ValueError(f"programs={programs:,} (--programs): {genes:,} genes hold at most "
                             f"{most:,} programs of >= {program_size[0]} genes (programs take "
                             f"{_PROGRAM_SHARE:.0%} of the genes); lower programs to at most "
                             f"{most:,} or raise genes (--genes) to at least {need:,}")
    problem = output_problem(out_dir)
    if problem:
        raise ValueError(f"out_dir {str(out_dir)!r} (--out): {problem}")
    rng = np.random.default_rng(seed)
    n_prog = programs if programs is not None else default_programs(genes)
    model = _Model(rng, genes, n_prog, cell_types, program_size,
                   exact=programs is not None and exact_programs)
    chunk = chunk_cells or max(64, (1 << 22) // genes)

    # perturbation targets: program genes, spread over programs
    prog_genes = np.flatnonzero(model.program >= 0)
    room = model.n_programs if distinct_programs else prog_genes.size
    if perturbations > room:
        what = "gene programs (one target each)" if distinct_programs else "program genes"
        raise ValueError(f"perturbations={perturbations:,} (--perturbations): this universe of "
                         f"{genes:,} genes has only {room:,} {what} to target; lower "
                         f"perturbations to at most {room:,} or raise genes (--genes)")
    out = Path(out_dir)
    final = out.resolve()
    made = missing_folders(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.synth-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        tmp.mkdir()
        names, filters = _build(tmp, model, rng, cells=cells, genes=genes,
                                perturbations=perturbations, batches=batches, bulk=bulk,
                                cell_types=cell_types, seed=seed, chunk=chunk, depth=depth,
                                shift=shift, distinct_programs=distinct_programs,
                                batch_effect=batch_effect)
        _move_into_place(tmp, final)
    except BaseException:  # KeyboardInterrupt and the CLI's Terminated too: nothing half-made
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made_folders(made)
        raise
    truth = out / "truth"
    return SynthResult(out, tuple(out / n for n in names), truth, truth / "gene_programs.tsv",
                       truth / "relationships.txt", truth / "perturbation_effects.tsv",
                       truth / "params.json", *filters)


# What an output holds; names ending in .h5ad.tmp are partial files older versions left.
_OUTPUT_FILES = ("screen.h5ad", "atlas.h5ad", "bulk.h5ad")
_TRUTH_FILES = ("gene_programs.tsv", "relationships.txt", "perturbation_effects.tsv",
                "cell_types.tsv", "params.json")


def _is_output(folder: Path) -> bool:
    """Whether ``folder`` carries the marker of an output of :func:`generate`."""
    try:
        doc = json.loads((folder / "truth" / "params.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("generator") == "txfm.data.synth"


def _foreign_entries(folder: Path) -> list[str]:
    """The entries of an output folder that :func:`generate` does not write."""
    known = {*_OUTPUT_FILES, *(f + ".tmp" for f in _OUTPUT_FILES), "truth"}
    foreign = [e.name for e in sorted(folder.iterdir()) if e.name not in known]
    truth = folder / "truth"
    if truth.is_dir():
        foreign += [f"truth/{e.name}" for e in sorted(truth.iterdir())
                    if e.name not in _TRUTH_FILES]
    return foreign


def output_problem(out_dir) -> str | None:
    """Why :func:`generate` cannot write into ``out_dir``, or None when it can (absent, an
    empty folder, or an earlier output of :func:`generate` holding nothing else). The message
    follows the path in an error line and says what to do. Leaves nothing behind."""
    from txfm.cli import folder_problem

    if str(out_dir) == "":
        return "is empty; give the name of the folder to write, e.g. --out raw"
    out = Path(out_dir)
    problem = folder_problem(out)
    if problem:
        return problem
    if not out.is_dir():
        return None
    final = out.resolve()
    cwd = Path.cwd().resolve()
    if final == cwd or final in cwd.parents:
        return ("is the current folder or holds it, and the output replaces that folder as a "
                "whole; give another folder, e.g. --out raw")
    problem = folder_problem(final.parent)  # the output is built next to it, then renamed
    if problem:
        return f"its parent folder {final.parent} {problem}"
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return None
    if not _is_output(out):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        return (f"is a folder that holds other files ({shown}), not an output of txfm data "
                f"synth, which replaces its output folder as a whole; give a new or empty "
                f"folder")
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        return (f"holds an earlier synth output, which would be replaced as a whole, and also "
                f"{shown}, which txfm data synth did not write; move that out of the folder "
                f"or give another folder")
    return None


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished output ``tmp`` to ``final``, replacing an earlier output there."""
    if final.is_dir() and any(final.iterdir()):
        # checked before the work began; again here, as a folder of someone else's must never go
        if not _is_output(final) or _foreign_entries(final):
            raise ValueError(f"out_dir {str(final)!r} (--out): changed while the output was "
                             f"made and now holds files txfm data synth did not write; give "
                             f"another folder")
        old = tmp.with_name(tmp.name + "-old")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)  # POSIX: replaces an empty folder
    except OSError:
        if not (final.is_dir() and not any(final.iterdir())):
            raise
        final.rmdir()
        os.rename(tmp, final)


def _kept_genes_per_cell(path: Path, keep: np.ndarray, nnz_per_read: int = 1 << 22) -> np.ndarray:
    """Genes with ``keep[gene]`` expressed in each cell of the ``.h5ad`` at ``path``
    (``int64 [cells]``), read a bounded number of non-zeros at a time."""
    import h5py

    with h5py.File(path, "r") as f:
        ip = np.asarray(f["X/indptr"][:], dtype=np.int64)
        if keep.all():
            return np.diff(ip)
        n = ip.size - 1
        out = np.empty(n, dtype=np.int64)
        a = 0
        while a < n:
            b = max(a + 1, int(np.searchsorted(ip, ip[a] + nnz_per_read, side="right")) - 1)
            b = min(b, n)
            kept = keep[f["X/indices"][ip[a]:ip[b]]]
            total = np.concatenate([[0], np.cumsum(kept, dtype=np.int64)])
            out[a:b] = total[ip[a + 1:b + 1] - ip[a]] - total[ip[a:b] - ip[a]]
            a = b
    return out


def _convert_filters(single_cell: list[tuple[Path, np.ndarray, int]]) -> tuple[int, int]:
    """``(min_cells, min_genes)`` for ``txfm data convert`` of these single-cell datasets
    (file, cells expressing each gene, cells): at most 20 and 100 (mild filters for data of the default
    size), lowered so that every dataset keeps genes and at least 95% of its cells after the
    converter's two filters (genes in >= min_cells cells, then cells with >= min_genes of the
    kept genes)."""
    smallest = min(int(n) for _, _, n in single_cell)
    min_cells = min(20, max(1, smallest // 20),
                    *(int(gene_cells.max()) for _, gene_cells, _ in single_cell))
    min_genes = 100
    for path, gene_cells, _ in single_cell:
        per_cell = _kept_genes_per_cell(path, gene_cells >= min_cells)
        min_genes = min(min_genes, int(np.quantile(per_cell, 0.05, method="lower")))
    return max(1, min_cells), max(0, min_genes)


def _build(tmp: Path, model: _Model, rng: np.random.Generator, *, cells: int, genes: int,
           perturbations: int, batches: int, bulk: int, cell_types: int, seed: int, chunk: int,
           depth: float, shift: tuple[float, float], distinct_programs: bool,
           batch_effect: tuple[float, float]) -> tuple[list[str], tuple[int, int]]:
    """Write every file of the output into the empty folder ``tmp``; returns the dataset file
    names in order and the suggested converter filters."""
    ids, syms = gene_ids(genes), gene_symbols(genes)
    type_names = [f"type_{t}" for t in range(cell_types)]
    prog_genes = np.flatnonzero(model.program >= 0)
    truth = tmp / "truth"
    truth.mkdir()
    n_targets = perturbations
    if distinct_programs:  # one target per program: every perturbation moves its own program
        progs = rng.choice(model.n_programs, n_targets, replace=False)
        targets = np.array([rng.choice(np.flatnonzero(model.program == p)) for p in progs],
                           dtype=np.int64)
    else:
        targets = rng.choice(prog_genes, n_targets, replace=False)
    kd_t = rng.uniform(1.5, 3.0, n_targets)
    shift_t = rng.uniform(*shift, n_targets) * rng.choice([-1.0, 1.0], n_targets)

    def subset(frac: float, must: np.ndarray) -> np.ndarray:
        keep = rng.random(genes) < frac
        keep[must] = True
        return np.flatnonzero(keep)

    written = []
    single_cell = []  # (file, cells per gene, cells) of the datasets the converter filters
    n_screen = max(10, int(round(cells * 0.65)))
    n_atlas = cells - n_screen
    # screen: two cell states, perturbed
    obs_screen = subset(0.82, targets)
    t_screen = (rng.random(n_screen) < 0.3).astype(np.int64)
    arm = np.where(rng.random(n_screen) < 0.12, -1, rng.integers(0, n_targets, n_screen))
    pg = np.where(arm >= 0, targets[np.maximum(arm, 0)], -1)
    label = np.where(arm >= 0, syms[targets[np.maximum(arm, 0)]], "non-targeting").astype(object)
    kd = np.where(arm >= 0, kd_t[np.maximum(arm, 0)], 0.0)
    sprog = np.where(arm >= 0, model.program[np.maximum(pg, 0)], -1)
    sh = np.where(arm >= 0, shift_t[np.maximum(arm, 0)], 0.0)
    b_screen = rng.integers(0, batches, n_screen)
    p = tmp / "screen.h5ad"
    gene_cells = _write_dataset(
        p, model, rng, observed=obs_screen, types=t_screen, batch=b_screen, n_batches=batches,
        depth_median=depth, depth_sigma=0.45, perturb_gene=pg, perturb_label=label, kd=kd,
        shift_prog=sprog, shift=sh, mix=None, noise=0.5, theta_scale=1.0, name="screen",
        kind="single-cell", chunk=chunk, type_names=type_names,
        batch_names=[f"screen_b{b}" for b in range(batches)], batch_effect=batch_effect)
    written.append(p.name)
    single_cell.append((p, gene_cells, n_screen))
    datasets_genes = {"screen": obs_screen}
    none = np.full(max(n_atlas, bulk, 1), -1)
    if n_atlas > 0:
        obs_atlas = subset(0.82, np.zeros(0, dtype=np.int64))
        props = rng.dirichlet(np.full(cell_types, 2.0))
        t_atlas = rng.choice(cell_types, n_atlas, p=props)
        b_atlas = rng.integers(0, batches, n_atlas)
        p = tmp / "atlas.h5ad"
        gene_cells = _write_dataset(
            p, model, rng, observed=obs_atlas, types=t_atlas, batch=b_atlas, n_batches=batches,
            depth_median=0.75 * depth, depth_sigma=0.5, perturb_gene=none[:n_atlas],
            perturb_label=np.full(n_atlas, "none", dtype=object), kd=np.zeros(n_atlas),
            shift_prog=none[:n_atlas], shift=np.zeros(n_atlas), mix=None, noise=0.5,
            theta_scale=1.0, name="atlas", kind="single-cell", chunk=chunk,
            type_names=type_names, batch_names=[f"atlas_b{b}" for b in range(batches)],
            batch_effect=batch_effect)
        written.append(p.name)
        single_cell.append((p, gene_cells, n_atlas))
        datasets_genes["atlas"] = obs_atlas
    if bulk > 0:
        obs_bulk = subset(0.95, np.zeros(0, dtype=np.int64))
        mix = rng.dirichlet(np.full(cell_types, 0.5), bulk)
        t_bulk = mix.argmax(axis=1)
        b_bulk = rng.integers(0, 2, bulk)
        p = tmp / "bulk.h5ad"
        _write_dataset(p, model, rng, observed=obs_bulk, types=t_bulk, batch=b_bulk, n_batches=2,
                       depth_median=2.0e6, depth_sigma=0.4, perturb_gene=none[:bulk],
                       perturb_label=np.full(bulk, "none", dtype=object), kd=np.zeros(bulk),
                       shift_prog=none[:bulk], shift=np.zeros(bulk), mix=mix, noise=0.1,
                       theta_scale=8.0, name="bulk", kind="bulk", chunk=max(8, chunk // 4),
                       type_names=type_names, batch_names=["bulk_b0", "bulk_b1"],
                       batch_effect=batch_effect)
        written.append(p.name)
        datasets_genes["bulk"] = obs_bulk

    # ---- ground truth
    prog_name = np.array([f"P{p:03d}" if p >= 0 else "" for p in model.program], dtype=object)
    observed_in = np.full(genes, "", dtype=object)
    for n, g in datasets_genes.items():
        observed_in[g] = observed_in[g] + np.where(observed_in[g] == "", n, "," + n)
    programs_tsv = truth / "gene_programs.tsv"
    pd.DataFrame({"gene_id": ids, "symbol": syms, "program": prog_name,
                  "loading": model.loading.round(4), "base_log_abundance": model.base.round(4),
                  "theta": model.theta.round(4), "observed_in": observed_in}
                 ).to_csv(programs_tsv, sep="\t", index=False)
    pairs = []
    for p in range(model.n_programs):
        members = np.sort(syms[model.program == p])
        a, b = np.triu_indices(members.size, k=1)
        pairs.append(pd.DataFrame({"entity1": members[a], "entity2": members[b]}))
    rel = truth / "relationships.txt"
    pd.concat(pairs).to_csv(rel, index=False)
    pert = truth / "perturbation_effects.tsv"
    n_cells_t = np.bincount(arm[arm >= 0], minlength=n_targets)
    pd.DataFrame({"target": syms[targets], "target_id": ids[targets],
                  "program": prog_name[targets], "knockdown_log": kd_t.round(4),
                  "program_shift": shift_t.round(4), "n_cells": n_cells_t}
                 ).to_csv(pert, sep="\t", index=False)
    pd.DataFrame(model.type_act.round(4), index=pd.Index(type_names, name="cell_type"),
                 columns=[f"P{p:03d}" for p in range(model.n_programs)]
                 ).to_csv(truth / "cell_types.tsv", sep="\t")
    filters = _convert_filters(single_cell)
    (truth / "params.json").write_text(json.dumps({
        "generator": "txfm.data.synth", "seed": seed, "cells": cells, "genes": genes,
        "perturbations": int(n_targets), "batches": batches, "bulk": bulk,
        "programs": int(model.n_programs), "cell_types": cell_types,
        "genes_in_programs": int((model.program >= 0).sum()),
        "datasets": {n: {"file": f"{n}.h5ad", "n_genes": int(g.size)}
                     for n, g in datasets_genes.items()},
        "n_cells": {"screen": n_screen, "atlas": n_atlas, "bulk": bulk},
        "non_targeting": int((arm < 0).sum()),
        "convert_filters": {"min_cells": filters[0], "min_genes": filters[1]},
    }, indent=1))
    return written, filters
