"""The reference tools' differential expression on data written by bench/de.R.

    python bench/de_peer.py DIR [--threads 2] [--epochs N] [--population]

DIR holds counts.mtx (genes x cells, raw counts), genes.txt and obs.csv (cell, batch, cell_type,
condition, sample). For every cell type, treated against control cells of that type (with
--population: treated against control cells of all types, reported as cell type "all"):
  scvi_change            scvi-tools 1.4.2 SCVI (its defaults, batch_key="batch"),
                         differential_expression(mode="change") with its defaults
                         (delta 0.25, fdr_target 0.05, no batch correction); calls are
                         its is_de_fdr_0.05 column
  scdistill_pseudobulk   scDistill 0.3.1 Distiller (its defaults), DE with
                         PseudobulkConfig() (pydeseq2 on its corrected expression), sample_key
  scdistill_bayesian     the same model, BayesianConfig(n_samples=100) (MC dropout)
Writes DIR/peer_<method>.csv (cell_type, gene, lfc, is_de) and DIR/peer_de.json (seconds:
model training and the DE calls, separately).
"""
import argparse
import json
import os
import time

# pydeseq2 fans out through joblib's loky processes, whose resource tracker
# fails on Python 3.11.7 ('_thread.RLock' has no '_recursion_count'); without
# multiprocessing joblib runs its jobs in this process.
os.environ.setdefault("JOBLIB_MULTIPROCESSING", "0")

import numpy as np
import pandas as pd
import scipy.io

from scdistill_compat import patch_harmonypy_layout

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--epochs", type=int, default=None)
p.add_argument("--skip-scvi", action="store_true", help="only scDistill (keeps an earlier scvi result)")
p.add_argument("--population", action="store_true", help="one comparison over all cell types")
a = p.parse_args()

import anndata  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(a.threads)
obs = pd.read_csv(os.path.join(a.dir, "obs.csv"), index_col=0)
obs.index = obs.index.astype(str)
for k in ["batch", "cell_type", "condition", "sample"]:
    obs[k] = obs[k].astype(str)
if a.population:
    obs["cell_type"] = "all"
obs["ct_cond"] = obs["cell_type"] + "|" + obs["condition"]
counts = scipy.io.mmread(os.path.join(a.dir, "counts.mtx")).T.tocsr().astype(np.float32)
with open(os.path.join(a.dir, "genes.txt")) as f:
    genes = [g.strip() for g in f if g.strip()]
types = sorted(obs["cell_type"].unique())
seconds = {}


def write(method, rows):
    pd.concat(rows).to_csv(os.path.join(a.dir, f"peer_{method}.csv"), index=False)


# scvi-tools
json_path = os.path.join(a.dir, "peer_de.json")
if a.skip_scvi:
    if os.path.exists(json_path):
        with open(json_path) as f:
            seconds = {k: v for k, v in json.load(f).items() if k.startswith("scvi")}
else:
    import scvi

    scvi.settings.seed = 0
    ad = anndata.AnnData(X=counts.copy(), obs=obs.copy(), var=pd.DataFrame(index=genes))
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(ad, batch_key="batch")
    model = scvi.model.SCVI(ad)
    model.train(max_epochs=a.epochs, accelerator="cpu", enable_progress_bar=False)
    seconds["scvi_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = []
    for ct in types:
        de = model.differential_expression(groupby="ct_cond", group1=f"{ct}|treated", group2=f"{ct}|control",
                                           mode="change", silent=True)
        de = de.reindex(genes)
        rows.append(pd.DataFrame({"cell_type": ct, "gene": genes, "lfc": de["lfc_mean"].values,
                                  "is_de": de["is_de_fdr_0.05"].values}))
    seconds["scvi_change"] = time.perf_counter() - t0
    write("scvi_change", rows)
    with open(json_path, "w") as f:
        json.dump(seconds, f)

# scDistill 0.3.1
import joblib  # noqa: E402
import pydeseq2.default_inference  # noqa: E402

import scdistill  # noqa: E402
from scdistill.de import BayesianConfig  # noqa: E402

# Without multiprocessing, joblib runs pydeseq2's loky jobs on threads, and its
# threading backend refuses the inner_max_num_threads=1 that pydeseq2 passes:
# run those blocks on threads without the limit.
pydeseq2.default_inference.parallel_backend = (
    lambda backend, inner_max_num_threads=None, **kw: joblib.parallel_backend("threading", **kw)
)

patch_harmonypy_layout()
torch.manual_seed(0)
np.random.seed(0)
ad = anndata.AnnData(X=counts.copy(), obs=obs.copy(), var=pd.DataFrame(index=genes))
epochs = {} if a.epochs is None else {"n_epochs_encoder": a.epochs, "n_epochs_decoder": a.epochs}
t0 = time.perf_counter()
dist = scdistill.Distiller(ad, batch_key="batch", device="cpu")
dist.train(verbose=False, **epochs)
seconds["scdistill_train"] = time.perf_counter() - t0
for method, how in [("scdistill_pseudobulk", None), ("scdistill_bayesian", BayesianConfig(n_samples=100))]:
    t0 = time.perf_counter()
    rows = []
    for ct in types:
        de = dist.differential_expression(groupby="ct_cond", group1=f"{ct}|treated", group2=f"{ct}|control",
                                          sample_key="sample", how=how)
        de = de.set_index("gene").reindex(genes)
        lfc = de["lfc"] if "lfc" in de else de["lfc_mean"]
        rows.append(pd.DataFrame({"cell_type": ct, "gene": genes, "lfc": lfc.values,
                                  "is_de": de["is_de"].fillna(False).astype(bool).values}))
    seconds[method] = time.perf_counter() - t0
    write(method, rows)

with open(json_path, "w") as f:
    json.dump(seconds, f)
