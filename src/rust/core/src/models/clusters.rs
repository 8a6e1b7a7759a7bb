//! Soft k-means clustering of a latent space (DiffBio's soft k-means
//! module): K learnable centroids μ_k and weights π_k, soft assignments
//! p_ik = softmax_k(log π_k − ‖z_i − μ_k‖² / T) at a fixed temperature T,
//! and as compactness loss soft k-means' free energy
//! −log Σ_k π_k exp(−‖z_i − μ_k‖² / T) per cell (its stationary centroids
//! are the p-weighted means of the cells), trained by the package's loop
//! (Adam on centroids and weights). The weights let types of unequal size
//! keep their own centroids: without them (and with the expected distance
//! Σ_k p_ik d²_ik as loss) training pulled a small type's centroid into a
//! large neighbour and lowered the ARI of a Leiden start from 0.97 to 0.74.
//!
//! * Unsupervised, the centroids start from a hard partition of the UMAP
//!   connectivities of the 15-NN graph by Leiden (modularity): at
//!   resolution γ when K is not given (K: its number of communities), else
//!   at the resolution that gives K communities (bisection), k-means
//!   (k-means++ seeds, best of 10 runs) when none does. A graph start
//!   finds types of unequal size that k-means splits or merges (10
//!   simulated types: ARI 0.80 from k-means). Training then moves the
//!   centroids to a stationary point of the soft objective.
//! * Supervised (labels given, `UNLABELED` where unknown), K is the number of
//!   labels, centroids start at the labelled cells' class means, and
//!   labelled cells contribute the cross-entropy of their label under p
//!   instead: the model becomes a nearest-centroid classifier (a prototype
//!   network) whose assignments of new cells are label predictions.
//!
//! T defaults to 2σ², σ² the pooled within-cluster variance per dimension
//! of the initial partition: p is then the posterior of a Gaussian mixture
//! with that shared isotropic variance, and the loss its negative
//! log-likelihood (up to a constant).
//!
//! By default (`per_cluster`) each cluster keeps its own temperature
//! T_k = 2σ_k², σ_k² its initial cells' variance per dimension shrunk
//! toward the pooled one by `PRIOR_CELLS` pseudo-cells and held within
//! [T/4, 4T]: the mixture then has one isotropic variance per component
//! (mclust's "VII"), and the logits gain −(d/2)·log(T_k / T). Types differ
//! in spread: on CellBench's 30 PCs one cell line's cells lie twice as far
//! from their mean as another's, and with one T a cell of the wide line
//! that was equally far from both centroids went to the narrow, larger one.
//! The temperatures stay fixed during training, as T does.
//!
//! By default (`shared_covariance`) the distances are Mahalanobis distances
//! in the pooled within-cluster covariance W of the initial partition,
//! scaled by its mean variance per dimension σ̄² (so round clusters keep
//! Euclidean distances and T its units): a Gaussian mixture with one
//! covariance for all components (mclust's "EEE" up to the per-cluster
//! scale), fixed during training like T. Cell types in a PCA share
//! elongated shapes (depth, cycle); Euclidean distances cut across them,
//! and on 12 weakly separated simulated types training moved the centroids
//! from a Leiden start (ARI 0.79) to k-means' answer (0.55); in the shared
//! metric it stays at 0.88.

use crate::data::Embedding;
use crate::device::seed_torch;
use crate::error::{check_param, invalid, Result};
use crate::io;
use crate::metrics::{kmeans, knn_auto, leiden, umap_connectivities, Graph};
use crate::models::labels::UNLABELED;
use crate::train::{train, EpochRecord, LossTerms, TrainConfig, Trainable, TrainingRecord};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

/// How the clusters are found; saved with the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// K (unsupervised); 0: as many as Leiden finds at `resolution`.
    pub n_clusters: usize,
    pub resolution: f64,
    /// T; 0: the mean squared distance of the cells to their initial centroid.
    pub temperature: f64,
    /// One temperature per cluster (when `temperature` is 0). Absent from
    /// files written before it: one shared T, as they were fitted.
    #[serde(default)]
    pub per_cluster: bool,
    /// Distances in the metric of the clusters' shared (pooled) covariance,
    /// not Euclidean. Files written before it have no metric (`metric`
    /// empty) and keep their Euclidean distances.
    pub shared_covariance: bool,
    /// Filled in by `fit`: the dimension of the latent space.
    pub n_latent: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            n_clusters: 0,
            resolution: 1.0,
            temperature: 0.0,
            per_cluster: true,
            shared_covariance: true,
            n_latent: 0,
        }
    }
}

/// A fitted soft clustering and what it was trained on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub config: ClusterConfig,
    /// Cluster names ("1", "2", ...) or, supervised, the labels.
    pub levels: Vec<String>,
    pub supervised: bool,
    /// The temperature used (the config's, or the one chosen).
    pub temperature: f64,
    /// Per cluster (`per_cluster`): T_k; empty: `temperature` for all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub temperatures: Vec<f64>,
    /// A (d × d, row-major) of the distances ‖(z − μ) A‖², A Aᵀ = σ̄² W⁻¹
    /// for the pooled within-cluster covariance W (shrunk toward σ̄² I,
    /// σ̄² = tr W / d); empty: Euclidean distances (A = I).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metric: Vec<f64>,
    #[serde(flatten)]
    pub training: TrainingRecord,
    /// Joint fine-tuning with the VAE whose latent space this clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tuned: Option<crate::models::joint::JointRecord>,
}

/// Pseudo-cells at the pooled variance added to each cluster's own when its
/// temperature is estimated (a small type's estimate is noisy).
const PRIOR_CELLS: f64 = 5.0;

/// A clustering's temperatures (one T, or T_k per cluster with the
/// logits' offsets −(d/2)·log(T_k / T)) and the metric of its distances.
pub(crate) struct Temperature {
    shared: f64,
    per_cluster: Option<(Tensor, Tensor)>,
    metric: Option<Tensor>,
}

impl Temperature {
    pub(crate) fn of(meta: &ClusterMeta, device: Device) -> Temperature {
        let d = meta.config.n_latent;
        let metric = (!meta.metric.is_empty()).then(|| {
            let a: Vec<f32> = meta.metric.iter().map(|&v| v as f32).collect();
            Tensor::from_slice(&a).view([d as i64, d as i64]).to_device(device)
        });
        let per_cluster = (!meta.temperatures.is_empty()).then(|| {
            let half_d = d as f64 / 2.0;
            let t: Vec<f32> = meta.temperatures.iter().map(|&t| t as f32).collect();
            let offset: Vec<f32> =
                meta.temperatures.iter().map(|&t| (-half_d * (t / meta.temperature).ln()) as f32).collect();
            (Tensor::from_slice(&t).to_device(device), Tensor::from_slice(&offset).to_device(device))
        });
        Temperature { shared: meta.temperature, per_cluster, metric }
    }
}

/// Soft k-means' assignment logits log π_k − ‖z_i − μ_k‖² / T (cells × K),
/// per cluster log π_k − ‖z_i − μ_k‖² / T_k − (d/2)·log(T_k / T), the
/// distances in the clustering's metric; `log_weights` are unnormalised.
/// Shared with the joint fine-tuning.
pub(crate) fn soft_logits(z: &Tensor, centroids: &Tensor, log_weights: &Tensor, temperature: &Temperature) -> Tensor {
    let gap = z.unsqueeze(1) - centroids.unsqueeze(0);
    let gap = match &temperature.metric {
        Some(a) => gap.matmul(a),
        None => gap,
    };
    let d2 = gap.square().sum_dim_intlist(-1, false, Kind::Float);
    let prior = log_weights.log_softmax(0, Kind::Float).unsqueeze(0);
    match &temperature.per_cluster {
        None => d2 / -temperature.shared + prior,
        Some((t, offset)) => -(d2 / t.unsqueeze(0)) + prior + offset.unsqueeze(0),
    }
}

/// The metric A (d × d, row-major) of the pooled within-cluster covariance
/// W of `gaps` (each cell minus its cluster's mean, m × d): A Aᵀ = σ̄² W_s⁻¹
/// with W_s = (1 − λ) W + λ σ̄² I, σ̄² = tr W / d, λ = d / (m + d) (a
/// shrinkage that keeps W_s invertible on few cells). Isotropic clusters
/// get A = I, so T keeps its units. `None` when W is 0.
fn shared_metric(gaps: &Tensor, d: usize) -> Option<Vec<f64>> {
    let m = gaps.size()[0] as f64;
    let w = gaps.tr().matmul(gaps) / m.max(1.0);
    let sigma2 = f64::try_from(w.trace()).ok()? / d as f64;
    if sigma2.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) || !sigma2.is_finite() {
        return None;
    }
    let lambda = d as f64 / (m + d as f64);
    let eye = Tensor::eye(d as i64, (Kind::Double, Device::Cpu));
    let ws = w * (1.0 - lambda) + eye * (lambda * sigma2);
    // W_s = V Λ Vᵀ, A = V Λ^(−1/2) σ̄.
    let (values, vectors) = ws.linalg_eigh("L");
    let scale = (values.clamp_min(sigma2 * 1e-6).reciprocal() * sigma2).sqrt();
    let a = vectors * scale.unsqueeze(0);
    Vec::<f64>::try_from(a.flatten(0, -1)).ok()
}

pub struct ClusterModel {
    pub meta: ClusterMeta,
    vs: nn::VarStore,
    centroids: Tensor,
    /// log π_k, the clusters' weights (normalised in `logits`).
    log_weights: Tensor,
    temperature: Temperature,
}

impl ClusterModel {
    fn new(meta: ClusterMeta) -> ClusterModel {
        let vs = nn::VarStore::new(Device::Cpu);
        let shape = [meta.levels.len() as i64, meta.config.n_latent as i64];
        let centroids = vs.root().var("centroids", &shape, nn::Init::Const(0.0));
        let log_weights = vs.root().var("log_weights", &[shape[0]], nn::Init::Const(0.0));
        let temperature = Temperature::of(&meta, Device::Cpu);
        ClusterModel { meta, vs, centroids, log_weights, temperature }
    }

    /// Clusters cells at latent coordinates `z` (cells × d, row-major).
    /// With `labels` (codes into `levels`, `UNLABELED` where unknown) the
    /// clustering is supervised.
    pub fn fit(
        z: &[f32],
        n: usize,
        labels: Option<(&[u32], Vec<String>)>,
        mut config: ClusterConfig,
        train_cfg: TrainConfig,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<ClusterModel> {
        check_param(n >= 2 && z.len() % n == 0 && !z.is_empty(), "latent", "must have one row per cell")?;
        if z.iter().any(|v| !v.is_finite()) {
            return invalid!("the latent space has missing or infinite values");
        }
        let d = z.len() / n;
        check_param(config.temperature >= 0.0 && config.temperature.is_finite(), "temperature", "must be positive")?;
        check_param(config.resolution > 0.0 && config.resolution.is_finite(), "resolution", "must be positive")?;
        train_cfg.check()?;
        config.n_latent = d;
        let zf: Vec<f64> = z.iter().map(|&v| v as f64).collect();
        let emb = Embedding::row_major(&zf, n, d);
        let supervised = labels.is_some();
        let (initial, levels): (Vec<u32>, Vec<String>) = match labels {
            Some((codes, levels)) => {
                check_param(codes.len() == n, "labels", "must have one value per cell")?;
                let k = levels.len();
                if codes.iter().any(|&c| c != UNLABELED && c as usize >= k) {
                    return invalid!("internal: a label code is out of range");
                }
                let mut seen = vec![0usize; k];
                codes.iter().filter(|&&c| c != UNLABELED).for_each(|&c| seen[c as usize] += 1);
                if let Some(l) = seen.iter().position(|&s| s == 0) {
                    return invalid!("label '{}' has no cells", levels[l]);
                }
                if k < 2 {
                    return invalid!("the labels have one class only: clustering by labels needs at least two");
                }
                (codes.to_vec(), levels)
            }
            None => {
                check_param(
                    config.n_clusters <= n,
                    "n_clusters",
                    format!("must be at most the number of cells ({n}), not {}", config.n_clusters),
                )?;
                let graph = || -> Result<Graph> { Ok(umap_connectivities(&knn_auto(&emb, 14, train_cfg.seed)?, 15)) };
                let codes = if config.n_clusters == 0 {
                    check_param(
                        n > 15,
                        "n_clusters",
                        "must be given for 15 cells or fewer (Leiden needs a 15-NN graph)",
                    )?;
                    leiden(&graph()?, config.resolution, train_cfg.seed)
                } else {
                    let by_graph = if n > 15 && config.n_clusters > 1 {
                        leiden_with_k(&graph()?, config.n_clusters, train_cfg.seed)
                    } else {
                        None
                    };
                    by_graph.unwrap_or_else(|| kmeans(&emb, config.n_clusters, 10, 300, train_cfg.seed))
                };
                let k = codes.iter().max().map_or(1, |&m| m as usize + 1);
                (codes, (1..=k).map(|c| c.to_string()).collect())
            }
        };
        let k = levels.len();
        check_param(k >= 1, "n_clusters", "must be at least 1")?;
        // Initial centroids: the means of the initial partition.
        let mut sums = vec![0.0f64; k * d];
        let mut counts = vec![0usize; k];
        for (i, &c) in initial.iter().enumerate().filter(|(_, &c)| c != UNLABELED) {
            counts[c as usize] += 1;
            for j in 0..d {
                sums[c as usize * d + j] += zf[i * d + j];
            }
        }
        for c in 0..k {
            for j in 0..d {
                sums[c * d + j] /= counts[c].max(1) as f64;
            }
        }
        // Each cell's gap to its initial cluster's mean; their pooled
        // covariance gives the metric (cell types share an elongated shape,
        // e.g. along sequencing depth, that Euclidean distances cut across).
        let members: Vec<(usize, usize)> =
            initial.iter().enumerate().filter(|(_, &c)| c != UNLABELED).map(|(i, &c)| (i, c as usize)).collect();
        let mut gaps = Vec::with_capacity(members.len() * d);
        for &(i, c) in &members {
            gaps.extend((0..d).map(|j| zf[i * d + j] - sums[c * d + j]));
        }
        let gaps = Tensor::from_slice(&gaps).view([members.len() as i64, d as i64]);
        let metric = match config.shared_covariance && d > 1 && k > 1 {
            true => shared_metric(&gaps, d).unwrap_or_default(),
            false => Vec::new(),
        };
        let gaps = match metric.is_empty() {
            true => gaps,
            false => gaps.matmul(&Tensor::from_slice(&metric).view([d as i64, d as i64])),
        };
        // Each initial cluster's sum of squared distances to its mean, S_k.
        let per_cell = Vec::<f64>::try_from(gaps.square().sum_dim_intlist(1, false, Kind::Double))?;
        let mut sq = vec![0.0f64; k];
        for (&(_, c), v) in members.iter().zip(per_cell) {
            sq[c] += v;
        }
        let temperature = if config.temperature > 0.0 {
            config.temperature
        } else {
            let m: usize = counts.iter().sum();
            // 2σ², σ² the pooled within-cluster variance per dimension: the
            // assignments are then a Gaussian mixture's posteriors.
            let t = 2.0 * sq.iter().sum::<f64>() / (m.max(1) * d) as f64;
            if t > 0.0 {
                t
            } else {
                1.0
            }
        };
        let temperatures = if config.temperature == 0.0 && config.per_cluster && k > 1 {
            // T_k = 2 · (S_k + PRIOR_CELLS · d · T / 2) / ((n_k + PRIOR_CELLS) · d),
            // within [T/4, 4T].
            (0..k)
                .map(|c| {
                    let t_c = (2.0 * sq[c] + PRIOR_CELLS * d as f64 * temperature)
                        / ((counts[c] as f64 + PRIOR_CELLS) * d as f64);
                    t_c.clamp(temperature / 4.0, temperature * 4.0)
                })
                .collect()
        } else {
            config.per_cluster = false;
            Vec::new()
        };
        seed_torch(train_cfg.seed);
        let meta = ClusterMeta {
            config,
            levels,
            supervised,
            temperature,
            temperatures,
            metric,
            training: TrainingRecord::new(train_cfg.clone(), Default::default(), n),
            fine_tuned: None,
        };
        let mut model = ClusterModel::new(meta);
        tch::no_grad(|| {
            let c = Tensor::from_slice(&sums.iter().map(|&v| v as f32).collect::<Vec<_>>()).view([k as i64, d as i64]);
            model.centroids.copy_(&c);
            let w: Vec<f32> = counts.iter().map(|&m| (m.max(1) as f32).ln()).collect();
            model.log_weights.copy_(&Tensor::from_slice(&w))
        });
        let zt = Tensor::from_slice(z).view([n as i64, d as i64]);
        let codes: Vec<i64> = match supervised {
            true => initial.iter().map(|&c| if c == UNLABELED { -1 } else { c as i64 }).collect(),
            false => vec![-1; n],
        };
        let ct = Tensor::from_slice(&codes);
        let task = ClusterTask { model: &model, z: &zt, codes: &ct };
        let history = train(&task, &train_cfg, interrupted, on_epoch)?;
        model.meta.training = TrainingRecord::new(train_cfg, history, n);
        Ok(model)
    }

    /// The assignment logits of every cell and centroid: [cells, K].
    fn logits(&self, z: &Tensor) -> Tensor {
        soft_logits(z, &self.centroids, &self.log_weights, &self.temperature)
    }

    fn loss(&self, z: &Tensor, codes: &Tensor) -> Tensor {
        let logits = self.logits(z);
        let logp = logits.log_softmax(-1, Kind::Float);
        // Compactness: soft k-means' free energy −log Σ_k π_k exp(−d²_k / T)
        // (per cluster: the mixture's negative log-likelihood up to a
        // constant), whose stationary centroids are the p-weighted means.
        let compact = -logits.logsumexp([-1i64].as_slice(), false);
        let y = codes.clamp_min(0).unsqueeze(1);
        let ce = -logp.gather(1, &y, false).squeeze_dim(1);
        ce.where_self(&codes.ge(0), &compact)
    }

    /// Soft assignments (cells × K, row-major) of cells at `z`.
    pub fn assign(&self, z: &[f32]) -> Result<Vec<f32>> {
        let d = self.meta.config.n_latent;
        if z.len() % d != 0 {
            return invalid!(
                "the cells have {} values where the clustering's latent space has {d} dimensions per cell",
                z.len()
            );
        }
        if z.iter().any(|v| !v.is_finite()) {
            return invalid!("the latent space has missing or infinite values");
        }
        let n = z.len() / d;
        let mut out = Vec::with_capacity(n * self.meta.levels.len());
        tch::no_grad(|| -> Result<()> {
            for start in (0..n).step_by(8192) {
                let end = (start + 8192).min(n);
                let zt = Tensor::from_slice(&z[start * d..end * d]).view([(end - start) as i64, d as i64]);
                out.extend(Vec::<f32>::try_from(self.logits(&zt).softmax(-1, Kind::Float).flatten(0, -1))?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Copies of the centroids [K, d] and log weights [K].
    pub(crate) fn centers(&self) -> (Tensor, Tensor) {
        (self.centroids.detach().copy(), self.log_weights.detach().copy())
    }

    /// Sets the centroids [K, d] and log weights [K].
    pub(crate) fn set_centers(&mut self, centroids: &Tensor, log_weights: &Tensor) {
        tch::no_grad(|| {
            self.centroids.copy_(centroids);
            self.log_weights.copy_(log_weights);
        });
    }

    /// The centroids (K × d, row-major).
    pub fn centroids(&self) -> Result<Vec<f32>> {
        Ok(Vec::<f32>::try_from(self.centroids.detach().flatten(0, -1))?)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        io::model_to_bytes(&self.vs, "clusters", &self.meta)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ClusterModel> {
        let (meta, tensors): (ClusterMeta, _) = io::model_from_bytes(bytes, "clusters", "a soft clustering")?;
        let model = ClusterModel::new(meta);
        io::load_into(&model.vs, &tensors)?;
        Ok(model)
    }
}

/// Leiden communities at a resolution that gives exactly `k` of them,
/// found by bisection on log(resolution) in [1e-3, 20] (the number of
/// communities grows with it); `None` when no resolution tried gives `k`.
fn leiden_with_k(graph: &Graph, k: usize, seed: u64) -> Option<Vec<u32>> {
    let (mut lo, mut hi) = (1e-3f64.ln(), 20f64.ln());
    for _ in 0..16 {
        let mid = 0.5 * (lo + hi);
        let codes = leiden(graph, mid.exp(), seed);
        let found = codes.iter().max().map_or(0, |&m| m as usize + 1);
        match found.cmp(&k) {
            std::cmp::Ordering::Equal => return Some(codes),
            std::cmp::Ordering::Less => lo = mid,
            std::cmp::Ordering::Greater => hi = mid,
        }
    }
    None
}

struct ClusterTask<'a> {
    model: &'a ClusterModel,
    z: &'a Tensor,
    codes: &'a Tensor,
}

impl Trainable for ClusterTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.model.vs
    }
    fn n_cells(&self) -> usize {
        self.codes.size()[0] as usize
    }
    fn loss(&self, rows: &[usize], _train: bool) -> LossTerms {
        let idx = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
        let loss = self.model.loss(&self.z.index_select(0, &idx), &self.codes.index_select(0, &idx));
        LossTerms::plain(loss)
    }
}

#[cfg(test)]
#[path = "clusters_tests.rs"]
mod tests;
