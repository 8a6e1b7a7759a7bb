//! Parametric UMAP (Sainburg, McInnes & Gentner 2021): a network f maps a
//! latent space to 2 (or more) dimensions, trained with UMAP's fuzzy
//! cross-entropy on the kNN graph, so that new cells are placed by f
//! rather than by re-running the layout.
//!
//! * Graph: the k-nearest neighbours (`n_neighbors` counting the cell, as
//!   UMAP) and their fuzzy simplicial set (`metrics::umap_connectivities`,
//!   the one the Leiden metrics use).
//! * Each epoch draws `edges_per_epoch` directed edges with probability
//!   proportional to their membership strength (UMAP samples an edge as
//!   often as its weight, `epochs_per_sample`). For an edge (i, j) the
//!   loss is the attraction −log q_ij, q = 1 / (1 + a‖f(x_i) − f(x_j)‖^{2b}),
//!   and for each of `negative_sample_rate` negatives (i, j') — j' the
//!   tail of another edge of the minibatch, as umap-learn's parametric
//!   version samples them — the repulsion −log(1 − q_ij'). Written as
//!   log1p(a s) and log1p(a s) − log(a s) (s = ‖·‖^{2b}), both are exact and
//!   need no clipping but a floor on a·s for the repulsion.
//! * a, b: UMAP's least-squares fit of 1 / (1 + a x^{2b}) to
//!   1 for x < min_dist and exp(−(x − min_dist) / spread) beyond, on 300
//!   points of [0, 3·spread].
//! * The input is centred and scaled by one overall standard deviation
//!   (distances keep their ratios); the network is `n_layers` ReLU layers of
//!   `n_hidden` units (umap-learn's default encoder: 3 × 100) and a linear
//!   output.

use crate::data::Embedding;
use crate::device::seed_torch;
use crate::error::{check_param, invalid, Result};
use crate::io;
use crate::metrics::{knn_auto, umap_connectivities};
use crate::nn::{linear, FcLayers, FcSpec, Norm};
use crate::train::{train, EpochRecord, LossTerms, TrainConfig, Trainable, TrainingRecord};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// The default epoch's edges at most: past ~70,000 cells an epoch no
/// longer grows with the data.
pub const MAX_EDGES_PER_EPOCH: usize = 1_000_000;

/// Settings of a parametric UMAP; saved with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UmapConfig {
    pub n_neighbors: usize,
    pub n_components: usize,
    pub min_dist: f64,
    pub spread: f64,
    pub n_hidden: usize,
    pub n_layers: usize,
    pub negative_sample_rate: usize,
    pub repulsion_strength: f64,
    /// Edges drawn per epoch; 0: as many as the graph has (directed), at
    /// most `MAX_EDGES_PER_EPOCH`.
    pub edges_per_epoch: usize,
    /// Filled in by `fit`.
    pub n_in: usize,
}

impl Default for UmapConfig {
    fn default() -> Self {
        UmapConfig {
            n_neighbors: 15,
            n_components: 2,
            min_dist: 0.1,
            spread: 1.0,
            n_hidden: 100,
            n_layers: 3,
            negative_sample_rate: 5,
            repulsion_strength: 1.0,
            edges_per_epoch: 0,
            n_in: 0,
        }
    }
}

/// A fitted parametric UMAP and what it was trained on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UmapMeta {
    pub config: UmapConfig,
    pub a: f64,
    pub b: f64,
    /// Input centring (per dimension) and scale (one number).
    pub center: Vec<f32>,
    pub scale: f32,
    /// Directed edges of the fuzzy graph.
    pub n_edges: usize,
    #[serde(flatten)]
    pub training: TrainingRecord,
}

pub struct UmapModel {
    pub meta: UmapMeta,
    vs: nn::VarStore,
    net: FcLayers,
    out: nn::Linear,
}

/// UMAP's curve parameters for `min_dist` and `spread` (its `find_ab_params`):
/// Levenberg–Marquardt least squares from UMAP's values for the defaults.
pub fn ab_params(min_dist: f64, spread: f64) -> (f64, f64) {
    let xs: Vec<f64> = (0..300).map(|i| 3.0 * spread * i as f64 / 299.0).collect();
    let ys: Vec<f64> = xs.iter().map(|&x| if x < min_dist { 1.0 } else { (-(x - min_dist) / spread).exp() }).collect();
    let sse = |a: f64, b: f64| -> f64 {
        xs.iter().zip(&ys).map(|(&x, &y)| (1.0 / (1.0 + a * x.powf(2.0 * b)) - y).powi(2)).sum()
    };
    let (mut a, mut b, mut lambda) = (1.577, 0.895, 1e-3);
    let mut cur = sse(a, b);
    for _ in 0..200 {
        // Gauss–Newton normal equations of the residuals r = f − y.
        let (mut jtj, mut jtr) = ([[0.0f64; 2]; 2], [0.0f64; 2]);
        for (&x, &y) in xs.iter().zip(&ys) {
            if x == 0.0 {
                continue;
            }
            let s = x.powf(2.0 * b);
            let f = 1.0 / (1.0 + a * s);
            let g = [-s * f * f, -a * s * 2.0 * x.ln() * f * f];
            let r = f - y;
            for p in 0..2 {
                jtr[p] += g[p] * r;
                for q in 0..2 {
                    jtj[p][q] += g[p] * g[q];
                }
            }
        }
        let (m00, m11, m01) = (jtj[0][0] * (1.0 + lambda), jtj[1][1] * (1.0 + lambda), jtj[0][1]);
        let det = m00 * m11 - m01 * m01;
        if det.abs() < 1e-300 {
            break;
        }
        let da = -(m11 * jtr[0] - m01 * jtr[1]) / det;
        let db = -(m00 * jtr[1] - m01 * jtr[0]) / det;
        let next = sse(a + da, b + db);
        if a + da > 0.0 && b + db > 0.0 && next < cur {
            let done = cur - next < 1e-14;
            a += da;
            b += db;
            cur = next;
            lambda /= 10.0;
            if done {
                break;
            }
        } else {
            lambda *= 10.0;
            if lambda > 1e12 {
                break;
            }
        }
    }
    (a, b)
}

impl UmapModel {
    fn new(meta: UmapMeta) -> UmapModel {
        let c = &meta.config;
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let net = FcLayers::new(
            &(&root / "encoder"),
            FcSpec {
                n_in: c.n_in,
                n_hidden: c.n_hidden,
                n_layers: c.n_layers,
                n_cov: 0,
                dropout: 0.0,
                norm: Norm::None,
                inject_all: false,
                sparse_input: false,
            },
        );
        let out = linear(&root / "output", c.n_hidden, c.n_components);
        UmapModel { meta, vs, net, out }
    }

    /// Trains a parametric UMAP of `z` (cells × d, row-major); returns the
    /// model and the cells' coordinates (cells × n_components, row-major).
    pub fn fit(
        z: &[f32],
        n: usize,
        mut config: UmapConfig,
        train_cfg: TrainConfig,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<(UmapModel, Vec<f32>)> {
        check_param(n >= 1 && !z.is_empty() && z.len() % n == 0, "latent", "must have one row per cell")?;
        if z.iter().any(|v| !v.is_finite()) {
            return invalid!("the latent space has missing or infinite values");
        }
        let d = z.len() / n;
        check_param(
            config.n_neighbors >= 2 && config.n_neighbors <= n,
            "n_neighbors",
            format!("must be between 2 and the number of cells ({n})"),
        )?;
        check_param(config.n_components >= 1, "n_components", "must be at least 1")?;
        check_param(
            config.min_dist >= 0.0 && config.spread > 0.0,
            "min_dist",
            "must be non-negative (and spread positive)",
        )?;
        check_param(config.min_dist <= config.spread, "min_dist", "must be at most `spread`")?;
        check_param(config.n_hidden >= 1 && config.n_layers >= 1, "n_hidden", "must be at least 1")?;
        check_param(config.negative_sample_rate >= 1, "negative_sample_rate", "must be at least 1")?;
        train_cfg.check()?;
        config.n_in = d;
        let (a, b) = ab_params(config.min_dist, config.spread);
        // Centre and scale.
        let mut center = vec![0.0f64; d];
        for row in z.chunks(d) {
            for (c, &v) in center.iter_mut().zip(row) {
                *c += v as f64;
            }
        }
        center.iter_mut().for_each(|c| *c /= n as f64);
        let var: f64 = z
            .chunks(d)
            .map(|row| row.iter().zip(&center).map(|(&v, c)| (v as f64 - c).powi(2)).sum::<f64>())
            .sum::<f64>()
            / (n * d) as f64;
        let scale = if var > 0.0 { var.sqrt() } else { 1.0 };
        let x: Vec<f64> =
            z.chunks(d).flat_map(|row| row.iter().zip(&center).map(|(&v, c)| (v as f64 - c) / scale)).collect();
        // The fuzzy graph's directed edges and the sampling distribution.
        let g = knn_auto(&Embedding::row_major(&x, n, d), config.n_neighbors - 1, train_cfg.seed)?;
        let graph = umap_connectivities(&g, config.n_neighbors);
        let (mut heads, mut tails, mut cum) = (Vec::new(), Vec::new(), Vec::new());
        let mut total = 0.0f64;
        for (i, row) in graph.adjacency().iter().enumerate() {
            for &(j, w) in row {
                if j as usize != i {
                    heads.push(i as i64);
                    tails.push(j as i64);
                    total += w;
                    cum.push(total);
                }
            }
        }
        if heads.is_empty() {
            return invalid!("the cells' neighbour graph has no edges (are all cells identical?)");
        }
        let n_edges = heads.len();
        if config.edges_per_epoch == 0 {
            config.edges_per_epoch = n_edges.min(MAX_EDGES_PER_EPOCH);
        }
        seed_torch(train_cfg.seed);
        let meta = UmapMeta {
            config: config.clone(),
            a,
            b,
            center: center.iter().map(|&c| c as f32).collect(),
            scale: scale as f32,
            n_edges,
            training: TrainingRecord::new(train_cfg.clone(), Default::default(), n),
        };
        let mut model = UmapModel::new(meta);
        let xt = Tensor::from_slice(&x.iter().map(|&v| v as f32).collect::<Vec<_>>()).view([n as i64, d as i64]);
        let task = UmapTask {
            model: &model,
            x: &xt,
            heads,
            tails,
            cum,
            seed: train_cfg.seed,
            drawn: RefCell::new((Tensor::new(), Tensor::new())),
        };
        let history = train(
            &task,
            &TrainConfig { validation_fraction: 0.0, early_stopping: false, ..train_cfg.clone() },
            interrupted,
            on_epoch,
        )?;
        model.meta.training = TrainingRecord::new(train_cfg, history, n);
        let coords = model.project(z)?;
        Ok((model, coords))
    }

    /// f of standardized inputs.
    fn embed(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.net.forward(x, None, false))
    }

    /// Per-edge loss: attraction of (heads, tails), repulsion of each head
    /// from `negative_sample_rate` tails of other edges of the minibatch.
    fn loss(&self, x: &Tensor, heads: &Tensor, tails: &Tensor) -> Tensor {
        let (a, b) = (self.meta.a, self.meta.b);
        let yh = self.embed(&x.index_select(0, heads));
        let yt = self.embed(&x.index_select(0, tails));
        let as_ = |u: &Tensor, v: &Tensor| {
            ((u - v).square().sum_dim_intlist(-1, false, Kind::Float).clamp_min(1e-12).pow_tensor_scalar(b)) * a
        };
        let mut loss = as_(&yh, &yt).log1p();
        let m = yh.size()[0];
        for _ in 0..self.meta.config.negative_sample_rate {
            let perm = Tensor::randperm(m, (Kind::Int64, Device::Cpu));
            let s = as_(&yh, &yt.index_select(0, &perm)).clamp_min(1e-4);
            loss += (s.log1p() - s.log()) * self.meta.config.repulsion_strength;
        }
        loss
    }

    /// Coordinates of cells at latent coordinates `z` (cells × n_in, row-major).
    pub fn project(&self, z: &[f32]) -> Result<Vec<f32>> {
        let d = self.meta.config.n_in;
        if z.len() % d != 0 {
            return invalid!("the cells have {} values where the UMAP's input has {d} dimensions per cell", z.len());
        }
        if z.iter().any(|v| !v.is_finite()) {
            return invalid!("the latent space has missing or infinite values");
        }
        let n = z.len() / d;
        let center = Tensor::from_slice(&self.meta.center);
        let mut out = Vec::with_capacity(n * self.meta.config.n_components);
        tch::no_grad(|| -> Result<()> {
            for start in (0..n).step_by(16384) {
                let end = (start + 16384).min(n);
                let x = (Tensor::from_slice(&z[start * d..end * d]).view([(end - start) as i64, d as i64]) - &center)
                    / self.meta.scale as f64;
                out.extend(Vec::<f32>::try_from(self.embed(&x).flatten(0, -1))?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        io::model_to_bytes(&self.vs, "umap", &self.meta)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<UmapModel> {
        let (meta, tensors): (UmapMeta, _) = io::model_from_bytes(bytes, "umap", "a parametric UMAP")?;
        io::check_meta("umap centring", meta.center.len(), meta.config.n_in)?;
        let model = UmapModel::new(meta);
        io::load_into(&model.vs, &tensors)?;
        Ok(model)
    }
}

struct UmapTask<'a> {
    model: &'a UmapModel,
    x: &'a Tensor,
    heads: Vec<i64>,
    tails: Vec<i64>,
    /// Cumulative edge weights, for drawing edges in proportion to them.
    cum: Vec<f64>,
    seed: u64,
    /// This epoch's edges (heads, tails).
    drawn: RefCell<(Tensor, Tensor)>,
}

impl Trainable for UmapTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.model.vs
    }
    fn n_cells(&self) -> usize {
        self.model.meta.config.edges_per_epoch
    }
    fn start_epoch(&self, epoch: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(1 + epoch as u64);
        let total = *self.cum.last().unwrap_or(&1.0);
        let m = self.model.meta.config.edges_per_epoch;
        let (mut h, mut t) = (Vec::with_capacity(m), Vec::with_capacity(m));
        for _ in 0..m {
            let u = rng.random::<f64>() * total;
            let e = self.cum.partition_point(|&c| c < u).min(self.cum.len() - 1);
            h.push(self.heads[e]);
            t.push(self.tails[e]);
        }
        *self.drawn.borrow_mut() = (Tensor::from_slice(&h), Tensor::from_slice(&t));
    }
    fn loss(&self, rows: &[usize], _train: bool) -> LossTerms {
        let idx = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
        let drawn = self.drawn.borrow();
        let loss = self.model.loss(self.x, &drawn.0.index_select(0, &idx), &drawn.1.index_select(0, &idx));
        LossTerms::plain(loss)
    }
}

#[cfg(test)]
#[path = "umap_tests.rs"]
mod tests;
