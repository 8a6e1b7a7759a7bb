# What scvi-tools 1.4.2 get_elbo() returns (scvi/model/base/_vaemixin.py, _log_likelihood.py):
#  - get_elbo() = -compute_elbo(); compute_elbo adds per cell reconstruction_loss + kl_local,
#    the NEGATIVE ELBO, so get_elbo() is the ELBO itself (its docstring: "higher is better").
#  - return_mean=True (default): the mean over the cells, a per-cell value, not a sum.
#  - reconstruction_loss = -log p(x|z,l) summed over genes (scvi/module/_vae.py VAE.loss), the
#    full NB/ZINB/Poisson log-pmf with lgamma(x + 1) (scvi/distributions/_negative_binomial.py).
#  - kl_local = kl_z + kl_l, unweighted (KL weight 1; the warm-up weight is not applied); kl_l = 0
#    with the SCVI default use_observed_lib_size=True (library = log sum x, no q(l)).
#  - one z ~ q(z|x) per cell (rsample), module in eval mode (no dropout, BatchNorm running stats).
#  So neg_elbo_* below = -get_elbo(): a positive per-cell bound on -log p(x), lower is better.
"""Trains scvi-tools 1.4.2 SCVI on the train cells of DIR and times its epochs.

    python bench/vae_scvi.py DIR [--epochs N] [--threads 2] [--likelihood zinb|nb|poisson]
        [--n-latent 10] [--n-hidden 128] [--n-layers 1] [--batch-size 128]
        [--kl-warmup-epochs K] [--seed 0] [--dispersion gene]

DIR holds counts.mtx (genes x cells, raw counts) and obs.csv (cell, batch, label,
split = train/validation). Trains on the train cells only, for exactly --epochs epochs
(default: scvi's heuristic, min(400, 400 * 20000 / n_train)); train_size=1.0, so no
internal validation split; no early stopping; KL warm-up over K epochs (default: all of
them; 0 = none). Writes DIR/scvi_vae_latent.csv (posterior means, all cells in obs.csv
order) and DIR/scvi_vae.json (timings: seconds_per_epoch_median leaves out epoch 1,
_mean is over all epochs; per-cell negative ELBO on the validation and train cells,
lower is better).
"""
import argparse
import json
import os
import statistics
import time

import numpy as np
import pandas as pd
import scipy.io

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--epochs", type=int, default=None)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
p.add_argument("--n-latent", type=int, default=10)
p.add_argument("--n-hidden", type=int, default=128)
p.add_argument("--n-layers", type=int, default=1)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--kl-warmup-epochs", type=int, default=None)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--dispersion", choices=["gene", "gene-batch", "gene-cell"], default="gene")
a = p.parse_args()

import anndata  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import scvi  # noqa: E402
import torch  # noqa: E402
from scvi.model._utils import get_max_epochs_heuristic  # noqa: E402

torch.set_num_threads(a.threads)
scvi.settings.seed = a.seed

obs = pd.read_csv(os.path.join(a.dir, "obs.csv"), index_col=0)
obs.index = obs.index.astype(str)
obs["batch"] = obs["batch"].astype(str).astype("category")
counts = scipy.io.mmread(os.path.join(a.dir, "counts.mtx")).T.tocsr().astype(np.float32)
ad = anndata.AnnData(X=counts, obs=obs)
is_train = (obs["split"] == "train").to_numpy()
ad_train = ad[is_train].copy()
ad_val = ad[obs["split"].eq("validation").to_numpy()].copy()
if a.epochs is None:
    a.epochs = get_max_epochs_heuristic(ad_train.n_obs)
warmup = a.epochs if a.kl_warmup_epochs is None else a.kl_warmup_epochs


class EpochTimer(pl.Callback):
    def __init__(self):
        self.seconds = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._t)


scvi.model.SCVI.setup_anndata(ad_train, batch_key="batch")
model = scvi.model.SCVI(
    ad_train,
    n_hidden=a.n_hidden,
    n_latent=a.n_latent,
    n_layers=a.n_layers,
    dispersion=a.dispersion,
    gene_likelihood=a.likelihood,
)
timer = EpochTimer()
t0 = time.perf_counter()
model.train(
    max_epochs=a.epochs,
    accelerator="cpu",
    train_size=1.0,
    batch_size=a.batch_size,
    early_stopping=False,
    plan_kwargs={"n_epochs_kl_warmup": warmup},
    enable_progress_bar=False,
    callbacks=[timer],
)
seconds_total = time.perf_counter() - t0
assert len(timer.seconds) == a.epochs, timer.seconds

neg_elbo_val = -float(model.get_elbo(adata=ad_val)) if ad_val.n_obs else None
neg_elbo_train = -float(model.get_elbo(adata=ad_train))
z = model.get_latent_representation(adata=ad)
cols = [f"z{i + 1}" for i in range(z.shape[1])]
pd.DataFrame(z, index=obs.index, columns=cols).to_csv(os.path.join(a.dir, "scvi_vae_latent.csv"))

later = timer.seconds[1:] or timer.seconds
out = {
    "method": f"scvi-tools {scvi.__version__}",
    "epochs": a.epochs,
    "seconds_train_total": seconds_total,
    "seconds_per_epoch_median": statistics.median(later),
    "seconds_per_epoch_mean": statistics.mean(timer.seconds),
    "n_train_cells": int(ad_train.n_obs),
    "neg_elbo_validation": neg_elbo_val,
    "neg_elbo_train": neg_elbo_train,
    "threads": a.threads,
    "n_validation_cells": int(ad_val.n_obs),
    "n_genes": int(ad.n_vars),
    "likelihood": a.likelihood,
    "n_latent": a.n_latent,
    "n_hidden": a.n_hidden,
    "n_layers": a.n_layers,
    "batch_size": a.batch_size,
    "kl_warmup_epochs": warmup,
    "dispersion": a.dispersion,
    "seed": a.seed,
    "seconds_per_epoch": timer.seconds,
}
with open(os.path.join(a.dir, "scvi_vae.json"), "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps({k: out[k] for k in list(out)[:9]}))
