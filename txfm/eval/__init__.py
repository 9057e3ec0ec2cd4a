"""Evaluate what TxFM learned (arXiv:2605.31562, evaluation).

Commands (``txfm/eval/cli.py``): ``txfm embed``, ``txfm genes``, ``txfm eval relationships``,
``txfm eval perturbation``. The same work as Python functions:

* :mod:`txfm.eval.embed`          ``embed_anndata``, ``embed_counts``, ``gene_representations``,
                                  ``remap_to_vocabulary``, ``map_input_genes``
* :mod:`txfm.eval.relationships`  ``load_databases``, ``recall_table``,
                                  ``evaluate_representations``, ``compute_recall``
* :mod:`txfm.eval.perturbation`   ``Labels``, ``postprocess``, ``perturbation_consistency``,
                                  ``linear_probe``, ``knn_retrieval``,
                                  ``perturbation_relationship_recall``, ``lisi``, ``ilisi``,
                                  ``evaluate_embedding``
* :mod:`txfm.eval.baselines`      ``expression_baselines``, ``pca_gene_loadings``, ``lib_log``,
                                  ``highly_variable_genes``
* :mod:`txfm.eval.genemap`        ``GeneTable``, ``match_genes``, ``gene_symbols``
* :mod:`txfm.eval.io`             ``read_cells`` (.h5ad, 10x folder, 10x .h5)

Modules import their heavy dependencies (torch, scikit-learn, anndata) only when used.
"""

# txfm embed's default K: every observable gene, at most this many times the training K
# (docs/learning.md: more genes at inference embed better; the cap bounds attention's cost)
EMBED_K_FACTOR = 8
