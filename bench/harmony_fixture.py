"""Reference output of harmonypy 2.1 for the core's Harmony test.

Writes src/rust/core/src/teacher/harmony/fixture.csv: 900 cells in 3 cell
types x 3 batches (unequal sizes), 6 dimensions with a strong batch shift,
and harmonypy's corrected coordinates with its defaults (theta 2, sigma 0.1,
dynamic lambda, K = 30). Run with the peers venv:
    $(bash bench/setup_peers.sh) bench/harmony_fixture.py
"""
import numpy as np
import pandas as pd
import harmonypy

rng = np.random.default_rng(5)
n, d = 900, 6
label = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
batch = rng.choice(3, size=n, p=[0.45, 0.35, 0.2])
centres = rng.normal(0, 4, size=(3, d))
shift = rng.normal(0, 2, size=(3, d))
x = np.round(centres[label] + shift[batch] + rng.normal(0, 1, size=(n, d)), 6)
meta = pd.DataFrame({"batch": [f"b{b}" for b in batch]})
h = harmonypy.run_harmony(x, meta, "batch", verbose=False, random_state=0)
z = np.asarray(h.Z_corr)
if z.shape[0] != n:
    z = z.T
df = pd.DataFrame(x, columns=[f"x{j + 1}" for j in range(d)])
for j in range(d):
    df[f"h{j + 1}"] = np.round(z[:, j], 6)
df["batch"] = batch
df["label"] = label
df.to_csv("src/rust/core/src/teacher/harmony/fixture.csv", index=False)
print("iterations:", len(h.objective_harmony) - 1, "objective:", np.round(h.objective_harmony, 3))
