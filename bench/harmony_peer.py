"""harmonypy 2.1 side of bench/harmony_vs_harmonypy.R.

    python bench/harmony_peer.py DIR N D THREADS

Reads DIR/pcs.f64 (N x D, row-major little-endian doubles) and DIR/batch.i32,
runs harmonypy.run_harmony with its defaults (theta 2) on THREADS cores and
writes DIR/harmonypy.f64 (N x D corrected) and DIR/harmonypy.json (seconds of
the run_harmony call, iterations).
"""
import json
import os
import sys
import time

import numpy as np
import pandas as pd
import harmonypy

d, n, dims, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = np.fromfile(os.path.join(d, "pcs.f64"), dtype="<f8").reshape(n, dims)
batch = np.fromfile(os.path.join(d, "batch.i32"), dtype="<i4")
meta = pd.DataFrame({"batch": pd.Categorical(batch)})
t0 = time.perf_counter()
ho = harmonypy.run_harmony(x, meta, "batch", verbose=False, ncores=threads, random_state=0)
seconds = time.perf_counter() - t0
z = np.asarray(ho.Z_corr)
if z.shape[0] != n:
    z = z.T
np.ascontiguousarray(z, dtype="<f8").tofile(os.path.join(d, "harmonypy.f64"))
with open(os.path.join(d, "harmonypy.json"), "w") as f:
    json.dump({"seconds": seconds, "iterations": len(ho.objective_harmony) - 1, "version": harmonypy.__version__ if hasattr(harmonypy, "__version__") else "2.1"}, f)
