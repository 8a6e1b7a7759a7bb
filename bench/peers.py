"""Runs one reference tool on data written by bench/run.R; writes its embedding.

    python bench/peers.py METHOD DIR [--epochs N] [--threads N] [--seed S] [--out NAME]

DIR holds counts.mtx (genes x cells, raw counts), obs.csv (cell, batch, label)
and pca.csv (cells x PCs, the package's PCA). METHOD:
  harmonypy  harmonypy 2.1.0 on pca.csv, theta = 2 (its defaults)
  scvi       scvi-tools 1.4.2 SCVI (n_latent 10, its defaults) on the counts
  scdistill_py  scDistill 0.3.1 (PyPI, Python) Distiller on the counts with its
             defaults (its own log2 CPM + PCA, HarmonyTeacher theta 2, n_latent
             50), CPU; writes the student encoder's latent. --epochs sets both
             n_epochs_encoder and n_epochs_decoder (default 100 each, early
             stopping on). Its teacher reads harmonypy < 2's Z_corr (d x N);
             harmonypy 2.1.0 gives N x d, so run_harmony is wrapped at runtime
             to hand it the old layout.
--threads sets torch's threads (scvi, scdistill_py); --seed their seed (default
0), for comparisons over several seeds.
Writes DIR/<METHOD>.csv (cells x dims) and DIR/<METHOD>.json (seconds spent
in the method itself, without reading the data), or DIR/<NAME>.csv/.json with
--out; scdistill_py also writes its teacher's embedding to
DIR/scdistill_py_teacher.csv.
"""
import argparse
import json
import os
import time

import numpy as np
import pandas as pd
import scipy.io

from scdistill_compat import patch_harmonypy_layout

p = argparse.ArgumentParser()
p.add_argument("method", choices=["harmonypy", "scvi", "scdistill_py"])
p.add_argument("dir")
p.add_argument("--epochs", type=int, default=None)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0, help="seed of torch/numpy (scdistill_py) and scvi.settings.seed (scvi)")
p.add_argument("--out", default=None, help="name of the embedding file (default: the method's)")
a = p.parse_args()

obs = pd.read_csv(os.path.join(a.dir, "obs.csv"), index_col=0)
obs["batch"] = obs["batch"].astype("category")

if a.method == "harmonypy":
    import harmonypy

    pcs = pd.read_csv(os.path.join(a.dir, "pca.csv"), index_col=0).values
    t0 = time.perf_counter()
    ho = harmonypy.run_harmony(pcs, obs, ["batch"], theta=2)
    seconds = time.perf_counter() - t0
    z = np.asarray(ho.Z_corr)
    emb = z if z.shape[0] == pcs.shape[0] else z.T  # 2.x: cells x PCs; < 2: PCs x cells
elif a.method == "scdistill_py":
    import anndata
    import scdistill
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    counts = scipy.io.mmread(os.path.join(a.dir, "counts.mtx")).T.tocsr().astype(np.float32)
    genes = [f"g{i}" for i in range(counts.shape[1])]
    ad = anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes))

    patch_harmonypy_layout()

    epochs = {} if a.epochs is None else {"n_epochs_encoder": a.epochs, "n_epochs_decoder": a.epochs}
    t0 = time.perf_counter()
    model = scdistill.Distiller(ad, batch_key="batch", device="cpu")
    model.train(verbose=False, **epochs)
    emb = model.latent.student
    seconds = time.perf_counter() - t0
    pd.DataFrame(model.latent.teacher, index=obs.index).to_csv(os.path.join(a.dir, "scdistill_py_teacher.csv"))
else:
    import anndata
    import scvi
    import torch

    torch.set_num_threads(a.threads)
    counts = scipy.io.mmread(os.path.join(a.dir, "counts.mtx")).T.tocsr().astype(np.float32)
    ad = anndata.AnnData(X=counts, obs=obs)
    scvi.settings.seed = a.seed
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(ad, batch_key="batch")
    model = scvi.model.SCVI(ad)
    model.train(max_epochs=a.epochs, accelerator="cpu", enable_progress_bar=False)
    emb = model.get_latent_representation()
    seconds = time.perf_counter() - t0

out = a.out or a.method
pd.DataFrame(emb, index=obs.index).to_csv(os.path.join(a.dir, f"{out}.csv"))
with open(os.path.join(a.dir, f"{out}.json"), "w") as f:
    json.dump({"method": a.method, "seconds": seconds}, f)
