"""Scores embeddings with scib-metrics' Benchmarker (the independent scorer).

    python bench/scib_score.py DIR [--threads N]

Run with the peers venv (python: the last line of bench/setup_peers.sh).
DIR holds obs.csv (index = cell; columns batch, label), pre.csv (cells x dims,
the unintegrated PCA, for the PCR comparison) and one emb_<name>.csv per
embedding (cells x dims, index = cell, the cells of obs.csv). Every embedding
goes into the obsm of one AnnData built from obs.csv (with pre.csv as "X_pre_pca";
to score the PCA itself, also write it as an emb_<name>.csv) and is scored by scib_metrics.benchmark.Benchmarker with its defaults
(BioConservation(), BatchCorrection(); scib-metrics 0.5.10: isolated labels,
k-means NMI/ARI, label silhouette, cLISI; BRAS, iLISI, kBET per label, graph
connectivity, PCR comparison), pre_integrated_embedding_obsm_key = the PCA of
pre.csv, its own pynndescent 90-NN graph per embedding (random_state 0,
n_jobs = --threads), then bm.benchmark() and bm.get_results(min_max_scale=False):
raw scores, the group means and Total = 0.6 bio + 0.4 batch. Nothing is
downloaded. --threads (default 2) also caps numba's and XLA's threads.

Writes DIR/scib.csv: one row per embedding (first column "embedding"), the
metrics under the names integration_metrics() uses (snake_case):
isolated_labels, nmi_kmeans, ari_kmeans, silhouette_label, clisi, bras, ilisi,
kbet, graph_connectivity, pcr_comparison, batch_correction, bio_conservation,
total. scib-metrics 0.5.10's default batch set has BRAS where
integration_metrics() has the batch silhouette (silhouette_batch), and its
kBET tests neighbourhoods of a diffusion map of the UMAP graph, so those two
scores, and the batch mean, are not expected to match integration_metrics().
"""
import argparse
import glob
import os
import time

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()

# Thread caps must be set before numba / jax are imported.
os.environ.setdefault("NUMBA_NUM_THREADS", str(a.threads))
os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(a.threads))
os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={a.threads}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import anndata  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scib_metrics  # noqa: E402
from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation  # noqa: E402

# Benchmarker's clean column names -> integration_metrics()' names.
NAMES = {
    "Isolated labels": "isolated_labels",
    "KMeans NMI": "nmi_kmeans",
    "KMeans ARI": "ari_kmeans",
    "Leiden NMI": "nmi_leiden",
    "Leiden ARI": "ari_leiden",
    "Silhouette label": "silhouette_label",
    "cLISI": "clisi",
    "Silhouette batch": "silhouette_batch",
    "BRAS": "bras",
    "iLISI": "ilisi",
    "KBET": "kbet",
    "Graph connectivity": "graph_connectivity",
    "PCR comparison": "pcr_comparison",
    "Batch correction": "batch_correction",
    "Bio conservation": "bio_conservation",
    "Total": "total",
}

obs = pd.read_csv(os.path.join(a.dir, "obs.csv"), index_col=0)
obs.index = obs.index.astype(str)
obs["batch"] = obs["batch"].astype(str).astype("category")
obs["label"] = obs["label"].astype(str).astype("category")


def read(path):
    e = pd.read_csv(path, index_col=0)
    e.index = e.index.astype(str)
    if len(e) != len(obs) or not e.index.isin(obs.index).all():
        raise SystemExit(f"{path}: its cells are not those of obs.csv")
    return np.ascontiguousarray(e.loc[obs.index].to_numpy(dtype=np.float32))


ad = anndata.AnnData(obs=obs)
ad.obsm["X_pre_pca"] = read(os.path.join(a.dir, "pre.csv"))
keys = []
for f in sorted(glob.glob(os.path.join(a.dir, "emb_*.csv"))):
    name = os.path.basename(f)[len("emb_") : -len(".csv")]
    ad.obsm[name] = read(f)
    keys.append(name)
if not keys:
    raise SystemExit(f"no emb_<name>.csv in {a.dir}")

t0 = time.perf_counter()
bm = Benchmarker(
    ad,
    batch_key="batch",
    label_key="label",
    embedding_obsm_keys=keys,
    bio_conservation_metrics=BioConservation(),
    batch_correction_metrics=BatchCorrection(),
    pre_integrated_embedding_obsm_key="X_pre_pca",
    n_jobs=a.threads,
    progress_bar=False,
)
bm.benchmark()
res = bm.get_results(min_max_scale=False)
res = res.loc[keys, :].rename(columns=NAMES).astype(float)
res.index.name = "embedding"
res.to_csv(os.path.join(a.dir, "scib.csv"))
print(f"scib-metrics {scib_metrics.__version__}: {len(keys)} embeddings x {ad.n_obs} cells, "
      f"{time.perf_counter() - t0:.1f} s -> {os.path.join(a.dir, 'scib.csv')}")
