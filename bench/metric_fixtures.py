"""Reference values for the integration-metric tests, from scib-metrics.

Writes tests/testthat/fixtures/metrics_embedding.csv (a fixed, partly mixed
embedding: 3 cell types x 3 batches, 450 cells, 8 dimensions, plus a
'pre-integration' embedding with a strong batch shift) and prints the scores
scib-metrics gives on it, using an exact 90-NN graph (the cell itself first)
so that no approximate search enters. Run with the peers venv:
    $(bash bench/setup_peers.sh) bench/metric_fixtures.py
"""
import numpy as np
import pandas as pd
import scib_metrics
from scib_metrics.nearest_neighbors import NeighborsResults
from sklearn.neighbors import NearestNeighbors

rng = np.random.default_rng(20261121)
n, d = 450, 8
label = np.repeat(np.arange(3), n // 3)
batch = np.tile(np.arange(3), n // 3)
centres = rng.normal(0, 3, size=(3, d))
batch_shift = rng.normal(0, 1.0, size=(3, d))
post = centres[label] + 0.6 * batch_shift[batch] + rng.normal(0, 1, size=(n, d))
pre = post + 4.0 * batch_shift[batch]
post, pre = np.round(post, 6), np.round(pre, 6)

df = pd.DataFrame(post, columns=[f"post{j + 1}" for j in range(d)])
for j in range(d):
    df[f"pre{j + 1}"] = pre[:, j]
df["batch"] = [f"b{b}" for b in batch]
df["label"] = [f"type{l}" for l in label]
df.to_csv("tests/testthat/fixtures/metrics_embedding.csv", index=False)

nn = NearestNeighbors(n_neighbors=90).fit(post)
dist, idx = nn.kneighbors(post)
knn = NeighborsResults(indices=idx, distances=dist)
out = {
    "ilisi": scib_metrics.ilisi_knn(knn, batch),
    "clisi": scib_metrics.clisi_knn(knn, label),
    "silhouette_label": scib_metrics.silhouette_label(post, label),
    "silhouette_batch": scib_metrics.silhouette_batch(post, label, batch),
    "isolated_labels": scib_metrics.isolated_labels(post, label, batch),
    "graph_connectivity": scib_metrics.graph_connectivity(knn.subset_neighbors(15), label),
    # categorical=True, as the Benchmarker calls it
    "pcr_comparison": scib_metrics.pcr_comparison(pre, post, batch, categorical=True),
}
km = scib_metrics.nmi_ari_cluster_labels_kmeans(post, label)
out["nmi_kmeans"], out["ari_kmeans"] = km["nmi"], km["ari"]
# Leiden on the 15-NN UMAP connectivities, best NMI over resolutions 0.2..2.0
le = scib_metrics.nmi_ari_cluster_labels_leiden(knn.subset_neighbors(15), label, seed=42)
out["nmi_leiden"], out["ari_leiden"] = le["nmi"], le["ari"]
print("scib-metrics", scib_metrics.__version__)
for k, v in out.items():
    print(f"{k} = {float(v):.6f}")
