//! Ambient RNA removal, CellBender's model (Fleming et al. 2023,
//! `remove-background`) reduced to cell-containing droplets: a VAE whose
//! expected counts are the cell's signal plus its droplet's ambient RNA,
//!
//!   μ_ng = l_n · [(1 − a_n) · ρ_g(z_n, b_n) + a_n · p_g],   x_ng ~ NB(μ_ng, θ_g),
//!
//! with l_n the observed library size, ρ the decoder's expression profile
//! (softmax), p the ambient profile (from empty droplets, or given), and
//! a_n ∈ (0, 1) the droplet's ambient share. As in CellBender, the empty
//! droplets say how many ambient molecules a droplet holds:
//! log(a_n · l_n) = log m + s · u_n, u_n ~ N(0, 1), with m and s those of
//! the empty droplets' log counts (or, without them, m = a prior share of
//! the median cell); u_n is amortised by its own encoder. That prior is what
//! separates "this cell expresses a little of gene g" from "this droplet
//! caught ambient g".
//!
//! Decontaminated counts: each count is split between cell and ambient by
//! their shares of its mean, x_ng · (1 − a)ρ / ((1 − a)ρ + a p), at the
//! posterior mean of z, and rounded to the nearest integer.

use crate::data::{Categorical, Csr};
use crate::device::seed_torch;
use crate::error::{check_param, invalid, Result};
use crate::io;
use crate::likelihood::nb_log_kernel;
use crate::nn::{kl_normal, linear, FcLayers, FcSpec, GaussianEncoder, Norm};
use crate::train::{train, EpochRecord, LossTerms, TrainConfig, Trainable, TrainingRecord};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// Architecture and prior; saved with the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmbientConfig {
    pub n_latent: usize,
    pub n_hidden: usize,
    pub n_layers: usize,
    pub dropout: f64,
    /// Prior of log(ambient molecules per droplet): mean and sd.
    pub prior_log_mean: f64,
    pub prior_log_sd: f64,
    /// Filled in by `fit`.
    pub n_genes: usize,
    pub n_batch: usize,
}

impl Default for AmbientConfig {
    fn default() -> Self {
        AmbientConfig {
            n_latent: 10,
            n_hidden: 128,
            n_layers: 1,
            dropout: 0.1,
            prior_log_mean: f64::NAN,
            prior_log_sd: 0.5,
            n_genes: 0,
            n_batch: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AmbientMeta {
    pub config: AmbientConfig,
    pub genes: Vec<String>,
    pub batch_levels: Vec<String>,
    pub profile: Vec<f32>,
    #[serde(flatten)]
    pub training: TrainingRecord,
}

pub struct AmbientModel {
    pub meta: AmbientMeta,
    vs: nn::VarStore,
    encoder: GaussianEncoder,
    share_net: FcLayers,
    share_out: nn::Linear,
    decoder: FcLayers,
    rho_out: nn::Linear,
    log_theta: Tensor,
    profile: Tensor,
}

/// Decontaminated counts (cells as rows) and each cell's ambient share.
#[derive(Debug, Clone)]
pub struct Decontaminated {
    pub counts: Csr,
    /// a_n: the ambient share of the cell's expected counts.
    pub ambient_share: Vec<f32>,
    /// The share of the cell's observed counts removed.
    pub removed: Vec<f32>,
}

impl AmbientModel {
    fn new(meta: AmbientMeta) -> AmbientModel {
        let c = &meta.config;
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let spec = |n_in: usize, n_cov: usize| FcSpec {
            n_in,
            n_hidden: c.n_hidden,
            n_layers: c.n_layers,
            n_cov,
            dropout: c.dropout,
            norm: Norm::Batch,
            inject_all: false,
            sparse_input: false,
        };
        let n_cov = if c.n_batch > 1 { c.n_batch } else { 0 };
        let encoder = GaussianEncoder::new(&(&root / "encoder"), spec(c.n_genes, 0), c.n_latent);
        let share_net = FcLayers::new(&(&root / "share"), spec(c.n_genes, 0));
        let share_out = linear(&root / "share_out", c.n_hidden, 1);
        let decoder = FcLayers::new(&(&root / "decoder"), FcSpec { dropout: 0.0, ..spec(c.n_latent, n_cov) });
        let rho_out = linear(&root / "rho", c.n_hidden, c.n_genes);
        let log_theta = root.var("log_theta", &[c.n_genes as i64], nn::Init::Const(0.0));
        let profile = Tensor::from_slice(&meta.profile).view([1, c.n_genes as i64]);
        AmbientModel { meta, vs, encoder, share_net, share_out, decoder, rho_out, log_theta, profile }
    }

    /// Trains on the cells' counts `counts` (cells as rows, genes as
    /// columns) with ambient profile `profile` (one share per gene).
    #[allow(clippy::too_many_arguments)]
    pub fn fit(
        counts: &Csr,
        genes: Vec<String>,
        batch: Option<&Categorical>,
        profile: &[f64],
        mut config: AmbientConfig,
        train_cfg: TrainConfig,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<AmbientModel> {
        let (n, g) = (counts.n_rows, counts.n_cols);
        check_param(n >= 2, "x", "must have at least 2 cells")?;
        if profile.len() != g {
            return invalid!("the ambient profile has {} genes where the counts have {g}", profile.len());
        }
        if profile.iter().any(|v| !v.is_finite() || *v < 0.0) || profile.iter().sum::<f64>() <= 0.0 {
            return invalid!("the ambient profile must be non-negative and not all zero");
        }
        let libs = counts.row_sums();
        if let Some(i) = libs.iter().position(|&l| l <= 0.0) {
            return invalid!("cell {} has no counts", i + 1);
        }
        if !config.prior_log_mean.is_finite() {
            return invalid!("internal: the ambient prior's mean is not set");
        }
        check_param(config.prior_log_sd > 0.0, "prior_log_sd", "must be positive")?;
        check_param(
            config.n_latent >= 1 && config.n_hidden >= 1 && config.n_layers >= 1,
            "n_latent",
            "must be at least 1",
        )?;
        train_cfg.check()?;
        config.n_genes = g;
        config.n_batch = batch.map_or(1, |b| b.levels.len());
        // A floor keeps log p finite for genes absent from the soup.
        let total: f64 = profile.iter().sum();
        let floor = 1e-8;
        let p: Vec<f32> = profile.iter().map(|&v| (v / total).max(floor) as f32).collect();
        let s: f32 = p.iter().sum();
        seed_torch(train_cfg.seed);
        let meta = AmbientMeta {
            config,
            genes,
            batch_levels: batch.map(|b| b.levels.clone()).unwrap_or_default(),
            profile: p.iter().map(|v| v / s).collect(),
            training: TrainingRecord::new(train_cfg.clone(), Default::default(), n),
        };
        let mut model = AmbientModel::new(meta);
        let codes = batch.map(|b| b.codes.clone());
        // Σ_g log Γ(x + 1) per cell: constant, so computed once rather than
        // over the dense minibatch at every step.
        let log_factorial = crate::models::log_factorial(counts);
        let task = AmbientTask { model: &model, counts, codes: codes.as_deref(), log_factorial: &log_factorial };
        let history = train(&task, &train_cfg, interrupted, on_epoch)?;
        model.meta.training = TrainingRecord::new(train_cfg, history, n);
        Ok(model)
    }

    fn batch_onehot(&self, codes: Option<&[u32]>, rows: &[usize]) -> Option<Tensor> {
        let k = self.meta.config.n_batch;
        if k <= 1 {
            return None;
        }
        let c: Vec<i64> = rows.iter().map(|&r| codes.map_or(0, |c| c[r] as i64)).collect();
        Some(Tensor::from_slice(&c).one_hot(k as i64).to_kind(Kind::Float))
    }

    /// (expected cell part (1 − a)ρ, ambient part a·p, a, u) per cell, at
    /// z = `z`. The droplet's ambient molecules are exp(m + s·u), u the
    /// amortised deviation from the prior's mean in prior sds, bounded to
    /// ±3 (a cell cannot hand its counts to the soup while the decoder is
    /// still poor, which it otherwise does early in training).
    fn parts(&self, x: &Tensor, x_log: &Tensor, z: &Tensor, cov: Option<&Tensor>, train: bool) -> [Tensor; 4] {
        let c = &self.meta.config;
        let u = self.share_out.forward(&self.share_net.forward(x_log, None, train)).tanh() * 3.0;
        let lib = x.sum_dim_intlist(-1, true, Kind::Float);
        let a = ((&u * c.prior_log_sd + c.prior_log_mean).exp() / lib).clamp(1e-6, 0.99);
        let rho = self.rho_out.forward(&self.decoder.forward(z, cov, train)).softmax(-1, Kind::Float);
        let cell = &rho * (1.0 - &a);
        let amb = &self.profile * &a;
        [cell, amb, a.squeeze_dim(1), u.squeeze_dim(1)]
    }

    fn dense(counts: &Csr, rows: &[usize]) -> (Tensor, Tensor) {
        let g = counts.n_cols;
        let mut x = vec![0f32; rows.len() * g];
        counts.dense_rows_into(rows, &mut x);
        let x = Tensor::from_slice(&x).view([rows.len() as i64, g as i64]);
        let xl = x.log1p();
        (x, xl)
    }

    /// Negative ELBO terms of cells `rows`; `log_factorial`: Σ_g log Γ(x + 1)
    /// of every cell of `counts`.
    fn loss(
        &self,
        counts: &Csr,
        codes: Option<&[u32]>,
        log_factorial: &[f32],
        rows: &[usize],
        train: bool,
    ) -> LossTerms {
        let (x, xl) = Self::dense(counts, rows);
        let cov = self.batch_onehot(codes, rows);
        let (qm, qv) = self.encoder.forward(&xl, None, train);
        let z = if train { &qm + qv.sqrt() * crate::dist::randn_rows(&qm) } else { qm.shallow_clone() };
        let [cell, amb, _, u] = self.parts(&x, &xl, &z, cov.as_ref(), train);
        let lib = x.sum_dim_intlist(-1, true, Kind::Float);
        let mu = (cell + amb) * &lib;
        let theta = self.log_theta.exp();
        let lf: Vec<f32> = rows.iter().map(|&r| log_factorial[r]).collect();
        let rec =
            -nb_log_kernel(&x, &mu, &theta, 1e-8).sum_dim_intlist(-1, false, Kind::Float) + Tensor::from_slice(&lf);
        let prior = u.square() * 0.5;
        let kl = kl_normal(&qm, &qv, &qm.zeros_like(), &qv.ones_like()).sum_dim_intlist(-1, false, Kind::Float);
        let zero = kl.zeros_like();
        LossTerms { reconstruction: rec + prior, kl_warmup: kl, kl_fixed: zero, deferred: vec![], penalty: None }
    }

    /// Decontaminated counts of cells `counts` (same genes, `codes`: their
    /// batch codes when the model has batches).
    pub fn decontaminate(&self, counts: &Csr, codes: Option<&[u32]>) -> Result<Decontaminated> {
        if counts.n_cols != self.meta.config.n_genes {
            return invalid!("the cells have {} genes where the model has {}", counts.n_cols, self.meta.config.n_genes);
        }
        let n = counts.n_rows;
        let (mut rows_out, mut share, mut removed) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        tch::no_grad(|| -> Result<()> {
            for start in (0..n).step_by(1024) {
                let rows: Vec<usize> = (start..(start + 1024).min(n)).collect();
                let (x, xl) = Self::dense(counts, &rows);
                let (qm, _) = self.encoder.forward(&xl, None, false);
                let cov = self.batch_onehot(codes, &rows);
                let [cell, amb, a, _] = self.parts(&x, &xl, &qm, cov.as_ref(), false);
                let keep = &cell / (&cell + &amb);
                let clean = (&x * keep).round();
                let clean_v = Vec::<f32>::try_from(clean.flatten(0, -1))?;
                share.extend(Vec::<f32>::try_from(a)?);
                let g = counts.n_cols;
                for (k, &r) in rows.iter().enumerate() {
                    let (idx, val) = counts.row(r);
                    let (mut i2, mut v2) = (Vec::with_capacity(idx.len()), Vec::with_capacity(idx.len()));
                    let (mut before, mut after) = (0f64, 0f64);
                    for (&j, &v) in idx.iter().zip(val) {
                        let c = clean_v[k * g + j as usize];
                        before += v as f64;
                        after += c as f64;
                        if c > 0.0 {
                            i2.push(j);
                            v2.push(c);
                        }
                    }
                    removed.push((1.0 - after / before.max(1.0)) as f32);
                    rows_out.push((i2, v2));
                }
            }
            Ok(())
        })?;
        Ok(Decontaminated { counts: Csr::from_rows(rows_out, counts.n_cols), ambient_share: share, removed })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        io::model_to_bytes(&self.vs, "ambient", &self.meta)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<AmbientModel> {
        let (meta, tensors): (AmbientMeta, _) = io::model_from_bytes(bytes, "ambient", "an ambient RNA model")?;
        io::check_meta("ambient profile", meta.profile.len(), meta.config.n_genes)?;
        let model = AmbientModel::new(meta);
        io::load_into(&model.vs, &tensors)?;
        Ok(model)
    }
}

struct AmbientTask<'a> {
    model: &'a AmbientModel,
    counts: &'a Csr,
    codes: Option<&'a [u32]>,
    log_factorial: &'a [f32],
}

impl Trainable for AmbientTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.model.vs
    }
    fn n_cells(&self) -> usize {
        self.counts.n_rows
    }
    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        self.model.loss(self.counts, self.codes, self.log_factorial, rows, train)
    }
}

#[cfg(test)]
#[path = "ambient_tests.rs"]
mod tests;
