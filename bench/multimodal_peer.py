# What scvi-tools 1.4.2 MULTIVI expects (scvi/model/_multivi.py, scvi/module/_multivae.py):
#  - MuData only: MULTIVI.setup_anndata() is a stub in 1.4 that just warns (DeprecationWarning)
#    and registers nothing, so the old "one AnnData, genes then peaks, n_genes/n_regions" route
#    no longer works. setup_mudata(modalities={"rna_layer", "atac_layer", "batch_key"}) puts the
#    RNA modality first, ATAC second; n_genes/n_regions then come from the registry.
#  - Paired vs unpaired is decided per cell inside the module (mask = counts summed > 0 per
#    modality); no modality key and no organize_multiome_anndatas are needed for paired data.
#  - Defaults: n_hidden = min(128, int(sqrt(n_regions))), n_latent = int(sqrt(n_hidden)),
#    2 encoder + 2 decoder layers, zinb genes, layer norm, lr 1e-4, KL warm-up 50 epochs,
#    adversarial modality mixing on, max_epochs 500.
"""Trains scvi-tools 1.4.2 MULTIVI on the paired RNA+ATAC train cells of DIR and times its epochs.

    python bench/multimodal_peer.py DIR [--epochs N] [--threads 2] [--seed 0]
        [--batch-size 128] [--n-latent N] [--n-hidden N]

DIR holds rna.mtx (genes x cells) and atac.mtx (peaks x cells), raw integer counts;
genes.txt and peaks.txt (one name a line); obs.csv (cell, batch, label, split =
train/validation). Trains on the train cells only, for exactly --epochs epochs (default:
MULTIVI.train's max_epochs, 500); train_size=1.0, so no internal validation split; no early
stopping; batch_key="batch"; every other MULTIVI hyper-parameter at its default (n_hidden and
n_latent too unless given). Writes DIR/multivi_latent.csv (joint posterior means, all cells in
obs.csv order) and DIR/multivi.json (timings: seconds_per_epoch_median leaves out epoch 1,
_mean is over all epochs; the hyper-parameters as read back from the model).
"""
import argparse
import inspect
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
p.add_argument("--seed", type=int, default=0)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--n-latent", type=int, default=None)
p.add_argument("--n-hidden", type=int, default=None)
a = p.parse_args()

import anndata  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import mudata  # noqa: E402
import scvi  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(a.threads)
scvi.settings.seed = a.seed
mudata.set_options(pull_on_update=False)  # keep mdata.obs as set below, no "rna:" copies


def read_mod(stem, names):
    x = scipy.io.mmread(os.path.join(a.dir, f"{stem}.mtx")).T.tocsr().astype(np.float32)
    with open(os.path.join(a.dir, names)) as f:
        var = f.read().splitlines()  # not read_csv: it would turn a name like "NA" into NaN
    assert x.shape == (len(obs), len(var)), (stem, x.shape, len(obs), len(var))
    return anndata.AnnData(X=x, obs=pd.DataFrame(index=obs.index), var=pd.DataFrame(index=var))


obs = pd.read_csv(os.path.join(a.dir, "obs.csv"), index_col=0)
obs.index = obs.index.astype(str)
obs["batch"] = obs["batch"].astype(str).astype("category")
md = mudata.MuData({"rna": read_mod("rna", "genes.txt"), "atac": read_mod("atac", "peaks.txt")})
md.obs = obs.copy()
is_train = (obs["split"] == "train").to_numpy()
md_train = md[is_train].copy()
train_defaults = inspect.signature(scvi.model.MULTIVI.train).parameters
if a.epochs is None:
    a.epochs = train_defaults["max_epochs"].default


class EpochTimer(pl.Callback):
    def __init__(self):
        self.seconds = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._t)


modalities = {"rna_layer": "rna", "atac_layer": "atac"}
scvi.model.MULTIVI.setup_mudata(md_train, batch_key="batch", modalities=modalities)
kw = {k: v for k, v in (("n_hidden", a.n_hidden), ("n_latent", a.n_latent)) if v is not None}
model = scvi.model.MULTIVI(md_train, **kw)
timer = EpochTimer()
t0 = time.perf_counter()
model.train(
    max_epochs=a.epochs,
    accelerator="cpu",
    train_size=1.0,
    batch_size=a.batch_size,
    early_stopping=False,
    enable_progress_bar=False,
    callbacks=[timer],
)
seconds_total = time.perf_counter() - t0
assert len(timer.seconds) == a.epochs, timer.seconds

md.obs["_indices"] = np.arange(md.n_obs)  # setup_mudata adds it; field transfer needs it too
t0 = time.perf_counter()
z = model.get_latent_representation(adata=md)  # all cells; fields transferred from md_train
latent_seconds = time.perf_counter() - t0
assert z.shape[0] == md.n_obs
cols = [f"z{i + 1}" for i in range(z.shape[1])]
pd.DataFrame(z, index=obs.index, columns=cols).to_csv(os.path.join(a.dir, "multivi_latent.csv"))

m = model.module
init = model.init_params_["non_kwargs"]
later = timer.seconds[1:] or timer.seconds
out = {
    "method": f"scvi-tools {scvi.__version__} MULTIVI",
    "epochs": a.epochs,
    "train_seconds": seconds_total,
    "seconds_per_epoch_median": statistics.median(later),
    "seconds_per_epoch_mean": statistics.mean(timer.seconds),
    "latent_seconds": latent_seconds,
    "n_cells_train": int(md_train.n_obs),
    "n_genes": int(model.n_genes),
    "n_regions": int(model.n_regions),
    "threads": a.threads,
    "n_cells_validation": int((~is_train).sum()),
    "scvi_version": scvi.__version__,
    "n_latent": int(m.n_latent),
    "n_hidden": int(m.n_hidden),
    "n_layers_encoder": int(m.n_layers_encoder),
    "n_layers_decoder": int(m.n_layers_decoder),
    "gene_likelihood": m.gene_likelihood,
    "dispersion": init["dispersion"],
    "dropout_rate": float(m.dropout_rate),
    "latent_distribution": m.latent_distribution,
    "modality_weights": init["modality_weights"],
    "modality_penalty": init["modality_penalty"],
    "region_factors": m.region_factors is not None,
    "use_batch_norm": init["use_batch_norm"],
    "use_layer_norm": init["use_layer_norm"],
    "n_batch": int(m.n_batch),
    "batch_size": a.batch_size,
    "lr": train_defaults["lr"].default,
    "weight_decay": train_defaults["weight_decay"].default,
    "n_epochs_kl_warmup": train_defaults["n_epochs_kl_warmup"].default,
    "adversarial_mixing": train_defaults["adversarial_mixing"].default,
    "seed": a.seed,
    "seconds_per_epoch": timer.seconds,
}
with open(os.path.join(a.dir, "multivi.json"), "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps({k: out[k] for k in list(out)[:10]}))
