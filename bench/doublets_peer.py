"""Doublet scores of the reference tools, each at its defaults, per batch (lane / plate).

    python bench/doublets_peer.py --counts DIR --out DIR [--threads 2] [--seed 0]
        [--methods scrublet,solo]

--counts DIR holds counts.mtx (Matrix Market, genes x cells, integer counts), cells.csv
(columns cell, batch) and genes.csv (column gene). Methods:
  scrublet  scrublet 0.2.3 (PyPI), on each batch's cells x genes counts separately:
            Scrublet(counts, random_state=seed).scrub_doublets() with its defaults
            (expected_doublet_rate 0.1, sim_doublet_ratio 2, 30 PCs, annoy kNN); score =
            doublet_scores_obs_, call = predicted_doublets_ (NA for the whole batch where
            its automatic threshold fails and it leaves predicted_doublets_ None).
  solo      scvi-tools 1.4.2: SCVI.setup_anndata(batch_key="batch"), SCVI(adata) with its
            defaults (all genes given, no HVG selection) trained once on all cells with
            train()'s defaults; then per batch SOLO.from_scvi_model(vae,
            restrict_to_batch=b) (no restrict_to_batch when there is one batch), train()
            defaults, score = predict(soft=True)["doublet"] (a probability since scvi-tools
            1.1.3), call = predict(soft=False) == "doublet".
Training runs on the CPU with the progress bar off (as in the other peers); neither is an
algorithmic setting. --threads caps BLAS/OpenMP (set before numpy loads) and torch;
--seed seeds scrublet (random_state) and scvi-tools (scvi.settings.seed: torch, numpy,
random).
Writes OUT/doublet_scores.csv (cell, method, score, call; call TRUE/FALSE/NA) and
OUT/doublet_times.json: seconds per method (scrublet: every Scrublet() + scrub_doublets();
solo: SCVI setup + training and every SOLO from_scvi_model + train + predict), a breakdown
per batch, epochs run, scrublet's thresholds, and package versions.
"""
import argparse
import os

p = argparse.ArgumentParser()
p.add_argument("--counts", required=True, help="input DIR (counts.mtx, cells.csv, genes.csv)")
p.add_argument("--out", required=True, help="output DIR")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--methods", default="scrublet,solo")
a = p.parse_args()
methods = [m.strip() for m in a.methods.split(",") if m.strip()]
bad = sorted(set(methods) - {"scrublet", "solo"})
if bad or not methods:
    p.error(f"--methods: unknown {bad}; choose from scrublet,solo")

# Thread caps must be in the environment before numpy / scipy / torch load their pools.
for v in ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"]:
    os.environ[v] = str(a.threads)

import importlib.metadata  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.io  # noqa: E402
import scipy.sparse  # noqa: E402

os.makedirs(a.out, exist_ok=True)
counts = scipy.io.mmread(os.path.join(a.counts, "counts.mtx"))
counts = scipy.sparse.csr_matrix(counts.T)  # cells x genes, integer
cells = pd.read_csv(os.path.join(a.counts, "cells.csv"), dtype=str, keep_default_na=False)
genes = pd.read_csv(os.path.join(a.counts, "genes.csv"), dtype=str, keep_default_na=False)["gene"]
if counts.shape != (len(cells), len(genes)):
    raise SystemExit(f"counts.mtx is {counts.shape[::-1]} (genes x cells); "
                     f"genes.csv has {len(genes)}, cells.csv {len(cells)}")
batches = list(dict.fromkeys(cells["batch"]))  # order of first appearance
rows = []
times = {"seconds": {}, "threads": a.threads, "seed": a.seed, "n_cells": len(cells),
         "n_genes": len(genes), "batches": {b: int((cells["batch"] == b).sum()) for b in batches}}


def add_rows(method, cell_names, score, call):
    """call: boolean array, or None for NA."""
    c = np.full(len(cell_names), "NA", dtype=object) if call is None else \
        np.where(np.asarray(call, dtype=bool), "TRUE", "FALSE")
    rows.append(pd.DataFrame({"cell": list(cell_names), "method": method,
                              "score": np.asarray(score, dtype=float), "call": c}))


if "scrublet" in methods:
    # scrublet 0.2.3 imports and runs unpatched on numpy 2.4 / scipy 1.17 / scikit-learn 1.9:
    # it converts the input to scipy.sparse.csc_matrix (spmatrix, so its `.A` calls still work)
    # and uses only PCA / TruncatedSVD / NearestNeighbors arguments sklearn still accepts.
    # It pulls in scikit-image (threshold_minimum for the automatic threshold) and annoy.
    import scrublet as scr

    detail = {}
    total = 0.0
    for b in batches:
        idx = np.flatnonzero((cells["batch"] == b).values)
        x = counts[idx].tocsc()
        t0 = time.perf_counter()
        s = scr.Scrublet(x, random_state=a.seed)
        s.scrub_doublets(verbose=False)
        sec = time.perf_counter() - t0
        total += sec
        pred = getattr(s, "predicted_doublets_", None)
        add_rows("scrublet", cells["cell"].values[idx], s.doublet_scores_obs_, pred)
        detail[b] = {"seconds": sec, "n_cells": len(idx),
                     "threshold": None if pred is None else float(s.threshold_),
                     "n_called": None if pred is None else int(np.sum(pred))}
    times["seconds"]["scrublet"] = total
    times["scrublet"] = detail

if "solo" in methods:
    import torch

    torch.set_num_threads(a.threads)
    import anndata
    import scvi

    # SOLO.predict warns on every call that soft=True gave logits before 1.1.3; 1.4.2 gives
    # softmax probabilities (the docstring says so), so the reminder is silenced.
    warnings.filterwarnings("ignore", message="Prior to scvi-tools 1.1.3")
    scvi.settings.seed = a.seed
    scvi.settings.num_threads = a.threads
    scvi.settings.dl_num_workers = 0
    kw = dict(accelerator="cpu", enable_progress_bar=False)

    obs = pd.DataFrame({"batch": pd.Categorical(cells["batch"].values, categories=batches)},
                       index=pd.Index(cells["cell"].values))
    ad = anndata.AnnData(X=counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes.values))
    ad.var_names_make_unique()

    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(ad, batch_key="batch")
    vae = scvi.model.SCVI(ad)
    vae.train(**kw)
    sec_scvi = time.perf_counter() - t0
    detail = {"seconds_scvi": sec_scvi, "scvi_epochs": len(vae.history["elbo_train"]), "per_batch": {}}
    total = sec_scvi
    for b in batches:
        t0 = time.perf_counter()
        solo = scvi.external.SOLO.from_scvi_model(vae, restrict_to_batch=b if len(batches) > 1 else None)
        solo.train(**kw)
        soft = solo.predict(soft=True)
        hard = solo.predict(soft=False)
        sec = time.perf_counter() - t0
        total += sec
        hist = solo.history.get("train_loss_epoch", next(iter(solo.history.values())))
        detail["per_batch"][b] = {"seconds": sec, "n_cells": len(soft), "epochs": len(hist),
                                  "n_called": int((hard == "doublet").sum())}
        add_rows("solo", soft.index, soft["doublet"].values, (hard.loc[soft.index] == "doublet").values)
    times["seconds"]["solo"] = total
    times["solo"] = detail

out = pd.concat(rows, ignore_index=True)
out.to_csv(os.path.join(a.out, "doublet_scores.csv"), index=False)
vers = {}
for pkg in ["scrublet", "scvi-tools", "torch", "anndata", "numpy", "scipy", "scikit-learn",
            "scikit-image", "annoy"]:
    try:
        vers[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        vers[pkg] = None
times["versions"] = vers
with open(os.path.join(a.out, "doublet_times.json"), "w") as f:
    json.dump(times, f, indent=1)
print(json.dumps({"seconds": times["seconds"], "versions": vers}))
