"""scvi-tools 1.4.2 SCVI trained on an .h5ad file opened in AnnData's backed mode (the peer of
bench/out_of_core.R --peer): reads the file with anndata.read_h5ad(backed="r"), sets up the
"batch" column of obs, trains SCVI at its defaults for exactly --epochs epochs on the CPU (no
early stopping), and writes JSON with the seconds of each phase, the seconds per epoch, and
the last validation ELBO as scvi-tools reports it (its elbo_validation: a per-cell negative
ELBO, the package's validation -ELBO's counterpart on scvi's own held-out 10%).

    python bench/backed_peer.py FILE.h5ad OUT.json [--epochs 1] [--threads 2]
"""
import argparse
import json
import time

p = argparse.ArgumentParser()
p.add_argument("h5ad")
p.add_argument("out")
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()

import anndata
import scvi
import torch

torch.set_num_threads(a.threads)
scvi.settings.seed = 0
t0 = time.time()
adata = anndata.read_h5ad(a.h5ad, backed="r")
t_open = time.time() - t0
t0 = time.time()
scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
model = scvi.model.SCVI(adata)
t_setup = time.time() - t0
t0 = time.time()
model.train(max_epochs=a.epochs, early_stopping=False, train_size=0.9, accelerator="cpu", check_val_every_n_epoch=1,
            enable_progress_bar=False)
t_train = time.time() - t0
hist = model.history
val = hist.get("elbo_validation")
out = {
    "backed": bool(adata.isbacked),
    "cells": int(adata.n_obs),
    "genes": int(adata.n_vars),
    "open_s": t_open,
    "setup_s": t_setup,
    "train_s": t_train,
    "epoch_s": t_train / a.epochs,
    "validation_elbo": float(val.iloc[-1, 0]) if val is not None else None,
}
json.dump(out, open(a.out, "w"))
print(json.dumps(out))
