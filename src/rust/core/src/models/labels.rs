//! A semi-supervised cell-type model on a fitted model's latent space, in
//! the manner of scANVI (Xu et al. 2021) with the latent z held fixed:
//! a classifier q(y | z) and a label-conditioned prior p(z | y) =
//! N(μ_y, diag σ²_y), p(y) uniform. Labelled cells contribute
//! −log p(z | y) + α · cross-entropy(q(y | z), y) (α: scANVI's
//! `classification_ratio`, 50); unlabelled cells the negative ELBO over y,
//! Σ_y q(y | z) [−log p(z | y) − log p(y) + log q(y | z)]. Keeping z fixed
//! (the posterior mean of the model's encoder) is what makes the model
//! usable after `map_query()`: the reference's latent space does not move,
//! so the classifier and the class densities apply to query cells as they are.
//!
//! Besides the label probabilities, a cell's squared Mahalanobis distance
//! to its predicted class, Σ (z − μ_y)² / σ²_y, says whether the class's
//! density explains it at all: a cell of a type absent from the labels can
//! be confidently classified yet lie far from every class.

use crate::device::seed_torch;
use crate::error::{check_param, invalid, Result};
use crate::io;
use crate::nn::{linear, FcLayers, FcSpec, Norm};
use crate::train::{train, EpochRecord, LossTerms, TrainConfig, Trainable, TrainingRecord};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// Code of an unlabelled cell.
pub const UNLABELED: u32 = u32::MAX;

/// Architecture and loss weights of a label model; saved with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LabelConfig {
    pub n_latent: usize,
    pub n_labels: usize,
    pub n_hidden: usize,
    pub n_layers: usize,
    pub dropout: f64,
    /// Weight of the labelled cells' cross-entropy (scANVI's 50).
    pub classification_ratio: f64,
}

impl Default for LabelConfig {
    fn default() -> Self {
        LabelConfig { n_latent: 0, n_labels: 0, n_hidden: 128, n_layers: 1, dropout: 0.1, classification_ratio: 50.0 }
    }
}

/// A label model and what it was trained on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelMeta {
    pub config: LabelConfig,
    pub levels: Vec<String>,
    pub n_labelled: usize,
    #[serde(flatten)]
    pub training: TrainingRecord,
}

pub struct LabelModel {
    pub meta: LabelMeta,
    vs: nn::VarStore,
    fc: FcLayers,
    out: nn::Linear,
    means: Tensor,
    log_vars: Tensor,
}

/// Predictions for some cells: label probabilities (cells × labels,
/// row-major) and each cell's squared Mahalanobis distance to its most
/// probable label's class density.
#[derive(Debug, Clone)]
pub struct LabelPrediction {
    pub probabilities: Vec<f32>,
    pub distance: Vec<f32>,
}

impl LabelModel {
    fn new(meta: LabelMeta, device: Device) -> LabelModel {
        let c = &meta.config;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let fc = FcLayers::new(
            &(&root / "classifier"),
            FcSpec {
                n_in: c.n_latent,
                n_hidden: c.n_hidden,
                n_layers: c.n_layers,
                n_cov: 0,
                dropout: c.dropout,
                norm: Norm::Layer,
                inject_all: false,
                sparse_input: false,
            },
        );
        let out = linear(&root / "logits", c.n_hidden, c.n_labels);
        let means = root.var("class_means", &[c.n_labels as i64, c.n_latent as i64], nn::Init::Const(0.0));
        let log_vars = root.var("class_log_vars", &[c.n_labels as i64, c.n_latent as i64], nn::Init::Const(0.0));
        LabelModel { meta, vs, fc, out, means, log_vars }
    }

    /// Trains a label model on latent coordinates `z` (cells × `n_latent`,
    /// row-major) with label codes `codes` (`UNLABELED` where unknown).
    pub fn fit(
        z: &[f32],
        codes: &[u32],
        levels: Vec<String>,
        mut config: LabelConfig,
        train_cfg: TrainConfig,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<LabelModel> {
        let n = codes.len();
        check_param(n >= 2 && z.len() % n == 0, "latent", "must have one row per cell")?;
        if z.iter().any(|v| !v.is_finite()) {
            return invalid!("the latent space has missing or infinite values");
        }
        let k = levels.len();
        if codes.iter().any(|&c| c != UNLABELED && c as usize >= k) {
            return invalid!("internal: a label code is out of range");
        }
        let mut seen = vec![0usize; k];
        for &c in codes.iter().filter(|&&c| c != UNLABELED) {
            seen[c as usize] += 1;
        }
        let n_labelled = seen.iter().sum::<usize>();
        if n_labelled == 0 {
            return invalid!("every cell is unlabelled: give the labels of at least some cells");
        }
        if seen.iter().filter(|&&s| s > 0).count() < 2 {
            return invalid!("the labels have one class only: a classifier needs at least two");
        }
        if let Some(l) = seen.iter().position(|&s| s == 0) {
            return invalid!("label '{}' has no cells", levels[l]);
        }
        config.n_latent = z.len() / n;
        config.n_labels = k;
        check_param(config.n_hidden >= 1 && config.n_layers >= 1, "n_hidden", "must be at least 1")?;
        check_param((0.0..1.0).contains(&config.dropout), "dropout", "must be in [0, 1)")?;
        check_param(config.classification_ratio >= 0.0, "classification_ratio", "must not be negative")?;
        train_cfg.check()?;
        seed_torch(train_cfg.seed);
        let meta = LabelMeta {
            config: config.clone(),
            levels,
            n_labelled,
            training: TrainingRecord::new(train_cfg.clone(), Default::default(), n),
        };
        let mut model = LabelModel::new(meta, Device::Cpu);
        let d = config.n_latent as i64;
        let zt = Tensor::from_slice(z).view([n as i64, d]);
        let ct =
            Tensor::from_slice(&codes.iter().map(|&c| if c == UNLABELED { -1 } else { c as i64 }).collect::<Vec<_>>());
        model.init_classes(&zt, &ct);
        let task = LabelTask { model: &model, z: &zt, codes: &ct };
        let history = train(&task, &train_cfg, interrupted, on_epoch)?;
        model.meta.training = TrainingRecord::new(train_cfg, history, n);
        Ok(model)
    }

    /// Class densities start at the labelled cells' means and variances.
    fn init_classes(&mut self, z: &Tensor, codes: &Tensor) {
        tch::no_grad(|| {
            for c in 0..self.meta.config.n_labels as i64 {
                let rows = codes.eq(c).nonzero().squeeze_dim(1);
                let zc = z.index_select(0, &rows);
                let m = zc.mean_dim(0, false, Kind::Float);
                let v = if zc.size()[0] > 1 { zc.var_dim(0, false, false) } else { m.ones_like() };
                self.means.get(c).copy_(&m);
                self.log_vars.get(c).copy_(&(v + 1e-3).log());
            }
        });
    }

    fn logits(&self, z: &Tensor, train: bool) -> Tensor {
        self.out.forward(&self.fc.forward(z, None, train))
    }

    /// log N(z; μ_y, σ²_y) for every cell and class: [cells, classes].
    fn log_density(&self, z: &Tensor) -> Tensor {
        let diff = z.unsqueeze(1) - self.means.unsqueeze(0);
        let lv = self.log_vars.unsqueeze(0);
        let quad = (diff.square() * (-&lv).exp()).sum_dim_intlist(-1, false, Kind::Float);
        let d = self.meta.config.n_latent as f64;
        (quad + lv.sum_dim_intlist(-1, false, Kind::Float) + d * (2.0 * std::f64::consts::PI).ln()) * -0.5
    }

    fn loss(&self, z: &Tensor, codes: &Tensor, train: bool) -> Tensor {
        let logits = self.logits(z, train);
        let logq = logits.log_softmax(-1, Kind::Float);
        let logp = self.log_density(z);
        let k = self.meta.config.n_labels as f64;
        let labelled = codes.ge(0);
        let y = codes.clamp_min(0).unsqueeze(1);
        let sup = -logp.gather(1, &y, false).squeeze_dim(1)
            - logq.gather(1, &y, false).squeeze_dim(1) * self.meta.config.classification_ratio;
        let q = logq.exp();
        let unsup = (&q * (-&logp + k.ln() + &logq)).sum_dim_intlist(-1, false, Kind::Float);
        sup.where_self(&labelled, &unsup)
    }

    /// Label probabilities and distances of cells at latent coordinates `z`.
    pub fn predict(&self, z: &[f32]) -> Result<LabelPrediction> {
        let d = self.meta.config.n_latent;
        if z.len() % d != 0 {
            return invalid!("the latent space has {} dimensions per cell where the label model has {d}", z.len());
        }
        if z.iter().any(|v| !v.is_finite()) {
            return invalid!("the latent space has missing or infinite values");
        }
        let n = z.len() / d;
        let (mut probabilities, mut distance) = (Vec::with_capacity(n * self.meta.levels.len()), Vec::with_capacity(n));
        tch::no_grad(|| -> Result<()> {
            for start in (0..n).step_by(4096) {
                let end = (start + 4096).min(n);
                let zt = Tensor::from_slice(&z[start * d..end * d]).view([(end - start) as i64, d as i64]);
                let p = self.logits(&zt, false).softmax(-1, Kind::Float);
                let best = p.argmax(-1, true);
                let diff = &zt - self.means.index_select(0, &best.squeeze_dim(1));
                let dist = (diff.square() * (-self.log_vars.index_select(0, &best.squeeze_dim(1))).exp())
                    .sum_dim_intlist(-1, false, Kind::Float);
                probabilities.extend(Vec::<f32>::try_from(p.flatten(0, -1))?);
                distance.extend(Vec::<f32>::try_from(dist)?);
            }
            Ok(())
        })?;
        Ok(LabelPrediction { probabilities, distance })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        io::model_to_bytes(&self.vs, "labels", &self.meta)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<LabelModel> {
        let (meta, tensors): (LabelMeta, _) = io::model_from_bytes(bytes, "labels", "a label model")?;
        io::check_meta("labels", meta.levels.len(), meta.config.n_labels)?;
        let model = LabelModel::new(meta, Device::Cpu);
        io::load_into(&model.vs, &tensors)?;
        Ok(model)
    }
}

struct LabelTask<'a> {
    model: &'a LabelModel,
    z: &'a Tensor,
    codes: &'a Tensor,
}

impl Trainable for LabelTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.model.vs
    }
    fn n_cells(&self) -> usize {
        self.codes.size()[0] as usize
    }
    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        let idx = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
        let loss = self.model.loss(&self.z.index_select(0, &idx), &self.codes.index_select(0, &idx), train);
        LossTerms::plain(loss)
    }
}

#[cfg(test)]
#[path = "labels_tests.rs"]
mod tests;
