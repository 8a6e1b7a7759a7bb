"""Runs scSpecies 0.1.4 (PyPI) on two species written by bench/species_vs_scspecies.R.

    python bench/species_peer.py DIR [--epochs N] [--threads 2] [--device cpu] [--seed 369963]

DIR holds, for each of `context` and `target`: <side>.mtx (genes x cells, raw
integer counts), <side>_genes.txt (one gene name a line) and <side>_obs.csv
(cell name, batch, cell_type); and homologs.csv, the homolog pairs (columns
`target`, `context`: gene names; many-to-many allowed).

scSpecies runs at its defaults (context model, then the target model aligned
to it; 40 + 40 epochs unless --epochs, which sets both; random_seed 369963
unless --seed;
no HVG selection, so every gene given is used). scSpecies takes no homolog
table: it translates target gene names itself (HCOP/MGI download or mygene).
Here the target genes are renamed to their context homolog, so its identity
path (same NCBI taxon for both) pairs them: a target gene's context name is
the first of its pairs in homologs.csv whose context gene exists and is not
already taken (scSpecies' own "first occurrence" rule); other target genes get
a name the context does not have. Outputs are mapped back to the original names.

Patches for scSpecies 0.1.4 quirks (see ../shared/PEERS.md), applied at
runtime, never to the installed package:
  - muon 0.1.9's set_options rejects pull_on_update: point it at mudata's;
  - OneHotEncoder.transform on an empty array (a cell type with <= 3 cells in
    every batch) crashes: return an empty matrix instead;
  - return_mdata(save=False) raises: build mudata.MuData(dataset_collection);
  - translate_gene_list downloads a table: avoided by the identity path above.

Writes to DIR: scspecies_z_context.csv and scspecies_z_target.csv (z_mu,
cells x 10, original cell names); scspecies_labels.csv (target cells:
pred_sim_cell_type, the transferred label, and pred_nns_cell_type, the
data-level neighbour vote); scspecies_lfc.csv (compute_logfold_change() at
its defaults, long: cell_type, target_gene, context_gene, lfc, p, lfc_rand,
p_rand, rho/mu medians); scspecies.json (seconds per phase: prepare (its
create_mdata/setup_target_adata, with the data-level neighbour search),
context (train_context + get_representation), target (train_target +
get_representation), transfer (transfer_labels_data), fold_changes; its own
balanced accuracies from ret_pred_df; cells kept, homologous genes).
Its working files (data/, out/) go to DIR/scspecies_work.
"""
import argparse
import json
import os
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--epochs", type=int, default=None)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--device", default="cpu")
p.add_argument("--seed", type=int, default=369963)
a = p.parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(a.threads)

import importlib.metadata  # noqa: E402

import anndata  # noqa: E402
import mudata  # noqa: E402
import muon  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.io  # noqa: E402
import scipy.sparse  # noqa: E402
import sklearn.preprocessing  # noqa: E402
import torch  # noqa: E402

import scspecies.models as scm  # noqa: E402
import scspecies.preprocessing as scp  # noqa: E402

torch.set_num_threads(a.threads)
DIR = os.path.abspath(a.dir)
KEY = "cell_type"
CTX, TGT = "context", "target"
TAXON = 10090  # the same for both: scSpecies' identity translation path


# --- quirk patches -----------------------------------------------------------
muon.set_options = mudata.set_options  # muon 0.1.9 rejects pull_on_update


class EmptySafeOneHotEncoder(sklearn.preprocessing.OneHotEncoder):
    """OneHotEncoder whose transform of no rows is an empty matrix, not an error."""

    def transform(self, X):
        if np.shape(X)[0] == 0:
            width = sum(len(c) for c in self.categories_)
            return scipy.sparse.csr_matrix((0, width), dtype=np.float64)
        return super().transform(X)


scp.OneHotEncoder = EmptySafeOneHotEncoder
scm.OneHotEncoder = EmptySafeOneHotEncoder


# --- data --------------------------------------------------------------------
def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()  # not read_csv: a gene named "NA" would become NaN


def read_side(side):
    x = scipy.io.mmread(os.path.join(DIR, f"{side}.mtx")).T.tocsr().astype(np.float32)
    genes = read_lines(os.path.join(DIR, f"{side}_genes.txt"))
    obs = pd.read_csv(os.path.join(DIR, f"{side}_obs.csv"), index_col=0, dtype=str, keep_default_na=False)
    obs.index = obs.index.astype(str)
    assert x.shape == (len(obs), len(genes)), (side, x.shape, len(obs), len(genes))
    obs = obs[["batch", KEY]].copy()
    obs["batch"] = obs["batch"].astype("category")
    obs[KEY] = pd.Categorical(obs[KEY], categories=sorted(obs[KEY].unique()))
    return anndata.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))


ad_ctx = read_side(CTX)
ad_tgt = read_side(TGT)
hom = pd.read_csv(os.path.join(DIR, "homologs.csv"), dtype=str, keep_default_na=False)

ctx_genes = set(ad_ctx.var_names)
taken = set()
first = {}
for t, c in zip(hom["target"], hom["context"]):
    if t in first or c in taken or c not in ctx_genes:
        continue
    first[t] = c
    taken.add(c)
renamed = []
for g in ad_tgt.var_names:
    if g in first:
        renamed.append(first[g])
    elif g in ctx_genes:
        renamed.append(f"nonhom_{g}")  # its own name exists in the context but is not its homolog
    else:
        renamed.append(g)
assert len(set(renamed)) == len(renamed), "renamed target genes must be unique"
orig_of = dict(zip(renamed, ad_tgt.var_names))
ad_tgt.var_names = renamed

work = os.path.join(DIR, "scspecies_work")
os.makedirs(work, exist_ok=True)
os.chdir(work)  # create_mdata writes ./data

epochs = {} if a.epochs is None else {"epochs": a.epochs}
seconds = {}

# --- scSpecies ---------------------------------------------------------------
t0 = time.perf_counter()
prep = scp.create_mdata(ad_ctx, batch_key="batch", cell_key=KEY, dataset_name=CTX, NCBI_Taxon_ID=TAXON)
prep.setup_target_adata(ad_tgt, batch_key="batch", cell_key=KEY, dataset_name=TGT, NCBI_Taxon_ID=TAXON)
mdata = mudata.MuData(prep.dataset_collection)  # return_mdata(save=False) raises in 0.1.4
model = scm.scSpecies(a.device, mdata, os.path.join(work, "out"), context_key=CTX, target_key=TGT,
                      random_seed=a.seed)
seconds["prepare"] = time.perf_counter() - t0

t0 = time.perf_counter()
model.train_context(**epochs)
model.get_representation("context", save_intermediate=True, save_libsize=True)
seconds["context"] = time.perf_counter() - t0

t0 = time.perf_counter()
model.train_target(**epochs)
model.get_representation("target", save_libsize=True)
seconds["target"] = time.perf_counter() - t0

t0 = time.perf_counter()
model.transfer_labels_data(KEY)
seconds["transfer"] = time.perf_counter() - t0

t0 = time.perf_counter()
lfc = model.compute_logfold_change()
seconds["fold_changes"] = time.perf_counter() - t0
seconds["total"] = sum(seconds.values())

_, bas_sim = model.ret_pred_df(f"pred_sim_{KEY}", KEY, KEY)
_, bas_nns = model.ret_pred_df(f"pred_nns_{KEY}", KEY, KEY)


# --- outputs -----------------------------------------------------------------
def cells(side):
    names = model.mdata.mod[side].obs_names.to_numpy().astype(str)
    suffix = f"_{side}"
    return [n[: -len(suffix)] if n.endswith(suffix) else n for n in names]


for side in (CTX, TGT):
    z = np.asarray(model.mdata.mod[side].obsm["z_mu"])
    cols = [f"z{i + 1}" for i in range(z.shape[1])]
    pd.DataFrame(z, index=cells(side), columns=cols).to_csv(os.path.join(DIR, f"scspecies_z_{side}.csv"))

tobs = model.mdata.mod[TGT].obs
pd.DataFrame(
    {f"pred_sim_{KEY}": tobs[f"pred_sim_{KEY}"].astype(str).to_numpy(),
     f"pred_nns_{KEY}": tobs[f"pred_nns_{KEY}"].astype(str).to_numpy()},
    index=cells(TGT),
).to_csv(os.path.join(DIR, "scspecies_labels.csv"))

rows = []
for ct, df in lfc.items():
    if not isinstance(df, pd.DataFrame):
        continue  # the 'lfc_delta' entry
    d = df.copy()
    d.insert(0, "context_gene", d.index.astype(str))
    d.insert(0, "target_gene", [orig_of[g] for g in d.index.astype(str)])
    d.insert(0, "cell_type", ct)
    rows.append(d)
pd.concat(rows).to_csv(os.path.join(DIR, "scspecies_lfc.csv"), index=False)

out = {
    "method": f"scSpecies {importlib.metadata.version('scspecies')}",
    "seconds": seconds,
    "balanced_accuracy_sim": float(bas_sim),
    "balanced_accuracy_nns": float(bas_nns),
    "epochs": a.epochs if a.epochs is not None else 40,
    "threads": a.threads,
    "seed": a.seed,
    "device": a.device,
    "n_context_in": int(ad_ctx.n_obs),
    "n_context_kept": int(model.mdata.mod[CTX].n_obs),
    "n_target_in": int(ad_tgt.n_obs),
    "n_target_kept": int(model.mdata.mod[TGT].n_obs),
    "n_homologous_genes": len(model.target_config["homologous_genes"]),
    "fold_change_types": [k for k, v in lfc.items() if isinstance(v, pd.DataFrame)],
    "versions": {k: importlib.metadata.version(k) for k in
                 ("scspecies", "muon", "mudata", "anndata", "numpy", "scikit-learn", "torch")},
    "python": sys.version.split()[0],
}
with open(os.path.join(DIR, "scspecies.json"), "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps({k: out[k] for k in ("method", "seconds", "balanced_accuracy_sim", "balanced_accuracy_nns",
                                       "n_context_kept", "n_target_kept", "n_homologous_genes")}))
