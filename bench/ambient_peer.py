"""Ambient RNA removal of the reference tool, CellBender 0.4.0 remove-background, on the CPU.

    python bench/ambient_peer.py --raw DIR --out DIR [--epochs 150] [--threads 2]

--raw DIR holds the raw droplet matrix, cells and empty droplets together, as a CellRanger
v2 MatrixMarket directory, which `cellbender remove-background --input DIR` reads as is:
  matrix.mtx    Matrix Market, genes x droplets, integer counts
  genes.tsv     gene id <TAB> gene name, one line per gene, no header
  barcodes.tsv  one droplet barcode per line, no header
and, for this script only,
  cells.txt     the barcodes of the cell-containing droplets, one per line (their order is
                the order of the outputs); every other barcode is an empty droplet.
CellBender is run as
  cellbender remove-background --input DIR --output OUT/cellbender.h5
      --expected-cells <cells> --total-droplets-included <--total-droplets>
      --epochs N --cpu-threads N
(no --cuda; every other setting at its default: model "full", FPR 0.01, the MCKP
estimator, learning rate 1e-4; its seed is fixed inside CellBender, consts.RANDOM_SEED),
in this process (cellbender.base_cli.main(), timed after the imports), with OUT as the
working directory (its checkpoint, ckpt.tar.gz, lands there). --threads also caps
BLAS/OpenMP (OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS, set before numpy and torch load).
--total-droplets defaults to the cells plus half the empty droplets. It cannot be every
droplet: CellBender takes the droplets ranked (by UMI count) past --total-droplets-included
as "surely empty", the source of its ambient profile and of the empty droplets it trains
on, and with none left it stops (IndexError in compute_crossover_surely_empty_and_stds).
Writes
  OUT/cellbender_counts.mtx  the denoised counts of the cells (genes x cells, cells.txt order)
  OUT/cellbender_cells.csv   cell, background_fraction (CellBender's: the share of the
                             droplet's counts it removed), cell_probability (NA for a
                             droplet CellBender did not analyse)
  OUT/ambient_times.json     seconds of remove-background (data loading, training,
                             posterior, estimation, output files; its HTML report timed
                             apart, seconds_report, and not included), epochs, droplet
                             counts, versions
and CellBender's own files (cellbender.h5, cellbender_filtered.h5, cellbender.log, ...).
"""
import argparse
import os

p = argparse.ArgumentParser()
p.add_argument("--raw", required=True, help="input DIR (matrix.mtx, genes.tsv, barcodes.tsv, cells.txt)")
p.add_argument("--out", required=True, help="output DIR")
p.add_argument("--epochs", type=int, default=150, help="CellBender's --epochs (its default 150)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--total-droplets", type=int, default=None,
               help="CellBender's --total-droplets-included (default: cells + half the empty droplets)")
a = p.parse_args()

for v in ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"]:
    os.environ[v] = str(a.threads)

import importlib.metadata  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.io  # noqa: E402
import scipy.sparse  # noqa: E402

raw = os.path.abspath(a.raw)
out = os.path.abspath(a.out)
os.makedirs(out, exist_ok=True)


def lines(path):
    with open(path) as f:
        return [x.rstrip("\n").split("\t")[0] for x in f if x.strip()]


barcodes = lines(os.path.join(raw, "barcodes.tsv"))
cells = lines(os.path.join(raw, "cells.txt"))
missing = sorted(set(cells) - set(barcodes))
if missing:
    raise SystemExit(f"cells.txt: {len(missing)} barcodes not in barcodes.tsv, e.g. {missing[:3]}")
n_genes = len(lines(os.path.join(raw, "genes.tsv")))
n_empty = len(barcodes) - len(cells)
total = a.total_droplets if a.total_droplets is not None else len(cells) + n_empty // 2
if not len(cells) < total < len(barcodes):
    raise SystemExit(f"--total-droplets {total}: must lie between the cells ({len(cells)}) and "
                     f"all droplets ({len(barcodes)}), both excluded")

import cellbender  # noqa: E402
import cellbender.base_cli  # noqa: E402
import cellbender.remove_background.run as cb_run  # noqa: E402

# CellBender's command line, run in this process (after its imports, so that the seconds
# are its work, not Python's start-up), with OUT as the working directory.
h5 = os.path.join(out, "cellbender.h5")
for f in [h5, os.path.join(out, "ckpt.tar.gz")]:  # no stale checkpoint / output is reused
    if os.path.exists(f):
        os.remove(f)
cmd = ["cellbender", "remove-background", "--input", raw, "--output", h5,
       "--expected-cells", str(len(cells)), "--total-droplets-included", str(total),
       "--epochs", str(a.epochs), "--cpu-threads", str(a.threads)]
print(" ".join(cmd), flush=True)

# Its HTML report (a notebook run through `jupyter nbconvert`, which fails harmlessly where
# jupyter is not on the PATH) is timed apart and left out of the seconds.
report_s = [0.0]
_make_html = cb_run.run_notebook_make_html


def timed_report(*args, **kwargs):
    t = time.time()
    try:
        return _make_html(*args, **kwargs)
    finally:
        report_s[0] += time.time() - t


cb_run.run_notebook_make_html = timed_report
sys.argv = cmd
os.chdir(out)
t0 = time.time()
cellbender.base_cli.main()
seconds_total = time.time() - t0
seconds = seconds_total - report_s[0]
if not os.path.exists(h5):
    raise SystemExit(f"cellbender remove-background wrote no {h5}; see {os.path.join(out, 'cellbender.log')}")

# The output h5 (CellRanger v3 layout): matrix (genes x barcodes, CSC) over every input
# barcode; droplet_latents over the analysed barcodes.
with h5py.File(h5, "r") as f:
    mg = f["matrix"]
    shape = tuple(mg["shape"][()])
    m = scipy.sparse.csc_matrix((mg["data"][()], mg["indices"][()], mg["indptr"][()]), shape=shape)
    out_barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in mg["barcodes"][()]]
    lat = f["droplet_latents"]
    idx = lat["barcode_indices_for_latents"][()].astype(int)
    bg = lat["background_fraction"][()]
    prob = lat["cell_probability"][()]
if shape[0] != n_genes:
    raise SystemExit(f"cellbender.h5 has {shape[0]} features, the input {n_genes}")
pos = {b: i for i, b in enumerate(out_barcodes)}
sel = np.array([pos[c] for c in cells])
counts = m[:, sel]
scipy.io.mmwrite(os.path.join(out, "cellbender_counts.mtx"), counts.tocoo(), field="integer")

# Latents are indexed by positions in the input barcodes (the same order as the output's).
bg_full = np.full(len(out_barcodes), np.nan)
p_full = np.full(len(out_barcodes), np.nan)
bg_full[idx] = bg
p_full[idx] = prob
raw_m = scipy.io.mmread(os.path.join(raw, "matrix.mtx")).tocsc()
bar_pos = {b: i for i, b in enumerate(barcodes)}
raw_tot = np.asarray(raw_m[:, [bar_pos[c] for c in cells]].sum(axis=0)).ravel()
den_tot = np.asarray(counts.sum(axis=0)).ravel()
frac = bg_full[sel]
# A cell CellBender did not analyse: its removed share from the matrices.
frac = np.where(np.isnan(frac), 1 - den_tot / np.maximum(raw_tot, 1), frac)
pd.DataFrame({"cell": cells, "background_fraction": frac, "cell_probability": p_full[sel]}).to_csv(
    os.path.join(out, "cellbender_cells.csv"), index=False, na_rep="NA")

versions = {k: importlib.metadata.version(k) for k in ["cellbender", "torch", "pyro-ppl", "numpy", "scipy"]}
times = {"seconds": seconds, "seconds_with_report": seconds_total, "seconds_report": report_s[0], "epochs": a.epochs,
         "threads": a.threads, "n_cells": len(cells), "n_droplets": len(barcodes),
         "total_droplets_included": total, "n_genes": n_genes,
         "n_analysed": int(len(idx)), "cells_called": int(np.nansum(p_full[sel] > 0.5)),
         "versions": versions, "command": cmd}
with open(os.path.join(out, "ambient_times.json"), "w") as f:
    json.dump(times, f, indent=1)
print(f"cellbender {versions['cellbender']}: {seconds:.1f} s ({a.epochs} epochs, {len(cells)} cells, "
      f"{len(barcodes)} droplets, {a.threads} threads)", flush=True)
