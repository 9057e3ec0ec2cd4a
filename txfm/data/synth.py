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
``params.json``.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SynthResult:
    out_dir: Path
    datasets: tuple[Path, ...]  # .h5ad files, in the order to give them to the converter
    truth_dir: Path
    programs: Path  # truth/gene_programs.tsv
    relationships: Path  # truth/relationships.txt (entity1,entity2)
    perturbations: Path  # truth/perturbation_effects.tsv
    params: Path  # truth/params.json


def gene_ids(n: int) -> np.ndarray:
    """Synthetic Ensembl-style ids (``ENSG9`` + 10 digits: never a real Ensembl id)."""
    return np.array([f"ENSG9{i:010d}" for i in range(n)], dtype=object)


def gene_symbols(n: int) -> np.ndarray:
    return np.array([f"SYN{i + 1:05d}" for i in range(n)], dtype=object)


class _Model:
    """Gene-level and cell-type-level parameters shared by all datasets."""

    def __init__(self, rng: np.random.Generator, genes: int, n_programs: int, n_types: int,
                 program_size: tuple[int, int] = (10, 40)):
        self.G = genes
        self.base = rng.normal(-1.0, 1.6, genes)
        self.theta = np.exp(rng.normal(np.log(3.0), 0.6, genes))
        self.program = np.full(genes, -1, dtype=np.int64)
        self.loading = np.zeros(genes)
        order = rng.permutation(genes)
        budget = int(0.45 * genes)
        pos = 0
        for p in range(n_programs):
            size = int(rng.integers(program_size[0], program_size[1] + 1))
            size = min(size, budget - pos)
            if size < 3:
                n_programs = p
                break
            members = order[pos:pos + size]
            self.program[members] = p
            self.loading[members] = rng.uniform(0.5, 1.2, size)
            pos += size
        self.n_programs = n_programs
        # dense [P, G] loading matrix: programs are few, so this stays small
        self.W = np.zeros((n_programs, genes))
        members = np.flatnonzero(self.program >= 0)
        self.W[self.program[members], members] = self.loading[members]
        on = rng.random((n_types, n_programs)) < 0.45
        self.type_act = np.where(on, rng.normal(0.0, 1.3, (n_types, n_programs)), 0.0)

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
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = h5py.File(self.tmp, "w")
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
        os.replace(self.tmp, self.path)


def _write_dataset(path: Path, model: _Model, rng: np.random.Generator, *, observed: np.ndarray,
                   types: np.ndarray, batch: np.ndarray, n_batches: int, depth_median: float,
                   depth_sigma: float, perturb_gene: np.ndarray, perturb_label: np.ndarray,
                   kd: np.ndarray, shift_prog: np.ndarray, shift: np.ndarray,
                   mix: np.ndarray | None,
                   noise: float, theta_scale: float, name: str, kind: str, chunk: int,
                   type_names: list[str], batch_names: list[str],
                   batch_effect: tuple[float, float]) -> None:
    n = types.size
    G = model.G
    batch_shift = rng.normal(0.0, batch_effect[0], (n_batches, G))
    batch_depth = np.exp(rng.normal(0.0, batch_effect[1], n_batches))
    depth = np.exp(rng.normal(np.log(depth_median), depth_sigma, n)) * batch_depth[batch]
    theta = model.theta * theta_scale
    w = _H5adWriter(path, observed.size)
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
        w.append(counts)
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


def generate(out_dir, *, cells: int = 20_000, genes: int = 3_000, perturbations: int = 50,
             batches: int = 3, bulk: int = 0, programs: int | None = None, cell_types: int = 8,
             seed: int = 0, chunk_cells: int | None = None, depth: float = 4000.0,
             program_size: tuple[int, int] = (10, 40), shift: tuple[float, float] = (0.8, 1.6),
             distinct_programs: bool = False,
             batch_effect: tuple[float, float] = (0.25, 0.3)) -> SynthResult:
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

    Raises:
        ValueError: a size out of range, a bad ``batch_effect``, or more ``perturbations``
            than this universe has program genes (with ``distinct_programs``: programs) to
            target; nothing is written then.
    """
    if cells < 20 or genes < 50:
        raise ValueError(f"need cells >= 20 and genes >= 50, got cells={cells}, genes={genes}")
    if batches < 1 or perturbations < 1 or cell_types < 2 or bulk < 0:
        raise ValueError("batches >= 1, perturbations >= 1, cell_types >= 2, bulk >= 0 required")
    if len(batch_effect) != 2 or not all(np.isfinite(v) and v >= 0 for v in batch_effect):
        raise ValueError(f"batch_effect must be two finite standard deviations >= 0 "
                         f"(gene shift, log depth), got {batch_effect!r}")
    rng = np.random.default_rng(seed)
    n_prog = programs or max(6, genes // 75)
    model = _Model(rng, genes, n_prog, cell_types, tuple(program_size))
    chunk = chunk_cells or max(64, (1 << 22) // genes)
    ids, syms = gene_ids(genes), gene_symbols(genes)
    type_names = [f"type_{t}" for t in range(cell_types)]

    # perturbation targets: program genes, spread over programs
    prog_genes = np.flatnonzero(model.program >= 0)
    room = model.n_programs if distinct_programs else prog_genes.size
    if perturbations > room:
        what = "gene programs (one target each)" if distinct_programs else "program genes"
        raise ValueError(f"perturbations={perturbations:,} (--perturbations): this universe of "
                         f"{genes:,} genes has only {room:,} {what} to target; lower "
                         f"perturbations to at most {room:,} or raise genes (--genes)")
    n_targets = perturbations
    out = Path(out_dir)
    truth = out / "truth"
    truth.mkdir(parents=True, exist_ok=True)  # after every check: a refused call writes nothing
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
    p = out / "screen.h5ad"
    _write_dataset(p, model, rng, observed=obs_screen, types=t_screen, batch=b_screen,
                   n_batches=batches, depth_median=depth, depth_sigma=0.45, perturb_gene=pg,
                   perturb_label=label, kd=kd, shift_prog=sprog, shift=sh, mix=None, noise=0.5,
                   theta_scale=1.0, name="screen", kind="single-cell", chunk=chunk,
                   type_names=type_names, batch_names=[f"screen_b{b}" for b in range(batches)],
                   batch_effect=batch_effect)
    written.append(p)
    datasets_genes = {"screen": obs_screen}
    none = np.full(max(n_atlas, bulk, 1), -1)
    if n_atlas > 0:
        obs_atlas = subset(0.82, np.zeros(0, dtype=np.int64))
        props = rng.dirichlet(np.full(cell_types, 2.0))
        t_atlas = rng.choice(cell_types, n_atlas, p=props)
        b_atlas = rng.integers(0, batches, n_atlas)
        p = out / "atlas.h5ad"
        _write_dataset(p, model, rng, observed=obs_atlas, types=t_atlas, batch=b_atlas,
                       n_batches=batches, depth_median=0.75 * depth, depth_sigma=0.5,
                       perturb_gene=none[:n_atlas],
                       perturb_label=np.full(n_atlas, "none", dtype=object),
                       kd=np.zeros(n_atlas), shift_prog=none[:n_atlas], shift=np.zeros(n_atlas),
                       mix=None, noise=0.5, theta_scale=1.0, name="atlas", kind="single-cell",
                       chunk=chunk, type_names=type_names,
                       batch_names=[f"atlas_b{b}" for b in range(batches)],
                       batch_effect=batch_effect)
        written.append(p)
        datasets_genes["atlas"] = obs_atlas
    if bulk > 0:
        obs_bulk = subset(0.95, np.zeros(0, dtype=np.int64))
        mix = rng.dirichlet(np.full(cell_types, 0.5), bulk)
        t_bulk = mix.argmax(axis=1)
        b_bulk = rng.integers(0, 2, bulk)
        p = out / "bulk.h5ad"
        _write_dataset(p, model, rng, observed=obs_bulk, types=t_bulk, batch=b_bulk, n_batches=2,
                       depth_median=2.0e6, depth_sigma=0.4, perturb_gene=none[:bulk],
                       perturb_label=np.full(bulk, "none", dtype=object), kd=np.zeros(bulk),
                       shift_prog=none[:bulk], shift=np.zeros(bulk), mix=mix, noise=0.1,
                       theta_scale=8.0, name="bulk", kind="bulk", chunk=max(8, chunk // 4),
                       type_names=type_names, batch_names=["bulk_b0", "bulk_b1"],
                       batch_effect=batch_effect)
        written.append(p)
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
    params = truth / "params.json"
    params.write_text(json.dumps({
        "generator": "txfm.data.synth", "seed": seed, "cells": cells, "genes": genes,
        "perturbations": int(n_targets), "batches": batches, "bulk": bulk,
        "programs": int(model.n_programs), "cell_types": cell_types,
        "genes_in_programs": int((model.program >= 0).sum()),
        "datasets": {n: {"file": f"{n}.h5ad", "n_genes": int(g.size)}
                     for n, g in datasets_genes.items()},
        "n_cells": {"screen": n_screen, "atlas": n_atlas, "bulk": bulk},
        "non_targeting": int((arm < 0).sum()),
    }, indent=1))
    return SynthResult(out, tuple(written), truth, programs_tsv, rel, pert, params)

