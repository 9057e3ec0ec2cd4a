"""``manifest.json`` of a shard collection: what the loader and the trainer need to know.

Written last by the converter (atomically), so its presence means the collection is
complete. :meth:`Manifest.load` checks it against the files (every listed shard present,
vocabulary hash matches ``vocab.tsv``) and raises a clear error otherwise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .layout import FORMAT_NAME, FORMAT_VERSION, MANIFEST, VOCAB_FILE
from .vocab import Vocabulary


@dataclass(frozen=True)
class DatasetInfo:
    """One input dataset: its name, kind, cell count and observable genes (vocabulary ids)."""

    name: str
    kind: str  # "single-cell" or "bulk"
    n_cells: int  # after filters (train + val)
    observable: np.ndarray  # int32, sorted vocabulary ids the dataset profiles (after filters)
    report: dict  # input sizes, filters, dropped genes, merged duplicates, source path


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the collection root, e.g. "dataset_3" or "val/dataset_0"
    split: str  # "train" or "val"
    n_cells: int
    nnz: int
    cell_offset: int  # global position of the shard's first cell (train shards first, then val)


@dataclass(frozen=True)
class Manifest:
    root: Path
    genes: "pd.DataFrame"  # vocabulary order; columns gene_id (Ensembl-style id or symbol), symbol
    vocab: Vocabulary  # the same as an object (ids, symbols, hash, lookup)
    vocab_hash: str
    datasets: tuple[DatasetInfo, ...]
    gene_nnz: np.ndarray  # int64 [G]: m_i, training cells in which gene i is non-zero
    shards: tuple[ShardInfo, ...]
    counts_dtype: str
    indices_dtype: str
    codec: str
    max_count: float
    integer_counts: bool
    seed: int
    fingerprint: str
    raw: dict  # the whole JSON document

    @property
    def n_genes(self) -> int:
        return len(self.vocab)

    @property
    def gene_ids(self) -> list[str]:
        return list(self.vocab.ids)

    @property
    def symbols(self) -> list[str]:
        return list(self.vocab.symbols)

    @property
    def n_cells(self) -> int:
        return sum(s.n_cells for s in self.shards)

    def split_shards(self, split: str) -> tuple[ShardInfo, ...]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return tuple(s for s in self.shards if s.split == split)

    def n_split_cells(self, split: str) -> int:
        return sum(s.n_cells for s in self.split_shards(split))

    def dataset_index(self, name: str) -> int:
        for i, d in enumerate(self.datasets):
            if d.name == name:
                return i
        raise KeyError(f"no dataset {name!r}; datasets: {[d.name for d in self.datasets]}")

    def observable(self):
        """Observable genes as :class:`txfm_kernels.ObservableGenes` (row = dataset id)."""
        import torch
        from txfm_kernels.masks import ObservableGenes

        mask = torch.zeros(len(self.datasets), self.n_genes, dtype=torch.bool)
        for d, info in enumerate(self.datasets):
            mask[d, torch.from_numpy(info.observable.astype(np.int64))] = True
        return ObservableGenes.from_mask(mask)

    @classmethod
    def load(cls, root) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            work = root / ".txfm-convert"
            hint = (" (a conversion was interrupted: re-run the same `txfm data convert` "
                    "command to finish it)") if work.exists() else ""
            raise FileNotFoundError(f"{root} is not a complete txfm shard collection: no "
                                    f"{MANIFEST}{hint}")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: corrupt manifest ({exc})") from exc
        if doc.get("format") != FORMAT_NAME or int(doc.get("version", -1)) > FORMAT_VERSION:
            raise ValueError(f"{path}: not a {FORMAT_NAME} manifest of version <= {FORMAT_VERSION} "
                             f"(format={doc.get('format')!r}, version={doc.get('version')!r})")
        vocab = Vocabulary.load(root / doc["vocab"]["file"])
        if vocab.hash != doc["vocab"]["hash"]:
            raise ValueError(f"{root / VOCAB_FILE}: vocabulary hash {vocab.hash} does not match "
                             f"the manifest's {doc['vocab']['hash']} (file edited or replaced)")
        datasets = tuple(DatasetInfo(d["name"], d["kind"], int(d["n_cells"]),
                                     np.asarray(d["observable"], dtype=np.int32), d["report"])
                         for d in doc["datasets"])
        shards = tuple(ShardInfo(s["path"], s["split"], int(s["n_cells"]), int(s["nnz"]),
                                 int(s["cell_offset"])) for s in doc["shards"])
        missing = [s.path for s in shards if not (root / s.path / "zarr.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: shards listed in the manifest are missing: "
                                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        genes = pd.DataFrame({"gene_id": list(vocab.ids), "symbol": list(vocab.symbols)})
        return cls(root=root, genes=genes, vocab=vocab, vocab_hash=vocab.hash, datasets=datasets,
                   gene_nnz=np.asarray(doc["gene_nnz"], dtype=np.int64), shards=shards,
                   counts_dtype=doc["counts_dtype"], indices_dtype=doc["indices_dtype"],
                   codec=doc["codec"], max_count=float(doc["max_count"]),
                   integer_counts=bool(doc["integer_counts"]), seed=int(doc["seed"]),
                   fingerprint=doc["fingerprint"], raw=doc)

    def summary(self) -> str:
        lines = [f"{self.root}: {self.n_cells:,} cells ({self.n_split_cells('train'):,} train, "
                 f"{self.n_split_cells('val'):,} val) x {self.n_genes:,} genes "
                 f"(vocab {self.vocab_hash}); {len(self.shards)} shards; counts "
                 f"{self.counts_dtype}, indices {self.indices_dtype}, codec {self.codec}"]
        for i, d in enumerate(self.datasets):
            lines.append(f"  [{i}] {d.name} ({d.kind}): {d.n_cells:,} cells, "
                         f"{d.observable.size:,} observable genes")
        return "\n".join(lines)
