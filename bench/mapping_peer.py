"""Reference mapping with scvi-tools 1.4.2, at its defaults: SCVI on the
reference, SCANVI.from_scvi_model() with the reference's labels, then
SCANVI.load_query_data() (scArches surgery) trained on the query, and
predict() on the query.

    python bench/mapping_peer.py DIR [--epochs N] [--label-epochs N] [--query-epochs N] [--threads 2]

DIR holds counts.mtx (genes x cells, raw counts) and obs.csv (cell, batch,
label, role = reference/query; label is "Unknown" where the reference cell
is unlabelled). Writes DIR/scvi_mapping.json (seconds of each stage, query
predictions' file, the largest change of any reference cell's latent
coordinate between the reference model and the mapped one) and
DIR/scvi_latent.csv (posterior means of the mapped model, every cell),
DIR/scvi_pred.csv (predicted label of each query cell).
"""
import argparse
import json
import os
import time

import numpy as np
import pandas as pd
import scipy.io

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--epochs", type=int, default=None)
p.add_argument("--label-epochs", type=int, default=None)
p.add_argument("--query-epochs", type=int, default=None)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()

import torch  # noqa: E402

torch.set_num_threads(a.threads)
import anndata  # noqa: E402
import scvi  # noqa: E402

scvi.settings.seed = 0
scvi.settings.num_threads = a.threads
scvi.settings.dl_num_workers = 0

x = scipy.io.mmread(os.path.join(a.dir, "counts.mtx")).T.tocsr().astype(np.float32)
obs = pd.read_csv(os.path.join(a.dir, "obs.csv"), index_col=0)
obs["batch"] = obs["batch"].astype(str)
ad = anndata.AnnData(X=x, obs=obs)
ref = ad[(obs["role"] == "reference").values].copy()
query = ad[(obs["role"] == "query").values].copy()

kw = dict(accelerator="cpu", enable_progress_bar=False)
out = {"method": f"scvi-tools {scvi.__version__} SCVI + SCANVI + load_query_data"}

t0 = time.perf_counter()
scvi.model.SCVI.setup_anndata(ref, batch_key="batch", labels_key="label")
vae = scvi.model.SCVI(ref)
vae.train(max_epochs=a.epochs, **kw)
out["seconds_reference"] = time.perf_counter() - t0
z_ref_before = vae.get_latent_representation(ref)

t0 = time.perf_counter()
lvae = scvi.model.SCANVI.from_scvi_model(vae, unlabeled_category="Unknown")
lvae.train(max_epochs=a.label_epochs, **kw)
out["seconds_labels"] = time.perf_counter() - t0
z_ref_scanvi = lvae.get_latent_representation(ref)

t0 = time.perf_counter()
query.obs["label"] = "Unknown"
scvi.model.SCANVI.prepare_query_anndata(query, lvae)
qm = scvi.model.SCANVI.load_query_data(query, lvae)
qm.train(max_epochs=a.query_epochs, plan_kwargs=dict(weight_decay=0.0), **kw)
out["seconds_mapping"] = time.perf_counter() - t0
out["query_epochs_run"] = len(qm.history["elbo_train"])

t0 = time.perf_counter()
pred = qm.predict(query)
out["seconds_predict"] = time.perf_counter() - t0
z_ref_after = qm.get_latent_representation(ref)
out["reference_latent_max_change"] = float(np.abs(z_ref_after - z_ref_scanvi).max())
out["scvi_vs_scanvi_latent_max_change"] = float(np.abs(z_ref_scanvi - z_ref_before).max())
z = np.vstack([z_ref_after, qm.get_latent_representation(query)])
pd.DataFrame(z, index=list(ref.obs_names) + list(query.obs_names)).to_csv(os.path.join(a.dir, "scvi_latent.csv"))
pd.DataFrame({"predicted": pred}, index=query.obs_names).to_csv(os.path.join(a.dir, "scvi_pred.csv"))
with open(os.path.join(a.dir, "scvi_mapping.json"), "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps(out))
