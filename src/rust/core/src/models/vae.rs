//! scVI-style variational autoencoder for counts (Lopez et al. 2018), with
//! scvi-tools 1.4 `SCVI` defaults.
//!
//! q(z | x): Gaussian encoder on log1p(counts) (covariates optional).
//! p(x | z, covariates): the design vector (one-hot batch, further categories,
//! continuous values) enters every decoder layer; ρ = softmax(decoder),
//! μ = library · ρ; NB, ZINB or Poisson observation model.
//! Library: observed log total counts, or learned with a per-batch
//! log-normal prior whose mean and variance are those of the batch's log
//! library sizes (as scVI).

use crate::data::{Categorical, CountMatrix, Covariates, Csr, DeviceCsr, DiskCsr, Rows, Scan};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Largest count matrix kept on a GPU for training (bytes).
const RESIDENT_MAX_BYTES: usize = 8 << 30;
use super::count_decoder::{CountDecoder, CountDecoderSpec};
use crate::device::seed_torch;
use crate::error::{check_param, invalid, Result};
use crate::io;
use crate::likelihood::SparseBatch;
use crate::mapping::{new_levels, transplant, FrozenTask, MapOptions};
use crate::models::Cells;
use crate::nn::{kl_normal, FcSpec, GaussianEncoder, Norm, Pass};
use crate::train::{default_max_epochs, train, EpochRecord, LossTerms, TrainConfig, Trainable, TrainingRecord};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::nn;
use tch::{Device, Kind, Tensor};

// The observation model is shared with the fused kernel; its old path stays.
pub use super::count_decoder::{Decoded, DecoderHeads, Dispersion};
pub use crate::likelihood::Likelihood;

/// Architecture of a VAE; saved with the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub n_genes: usize,
    pub n_latent: usize,
    pub n_hidden: usize,
    pub n_layers: usize,
    pub dropout: f64,
    pub norm: Norm,
    pub likelihood: Likelihood,
    pub dispersion: Dispersion,
    pub learn_library: bool,
    pub encode_covariates: bool,
    pub deeply_inject_covariates: bool,
    /// Number of batches, and the width of the whole design vector.
    pub n_batch: usize,
    pub n_design: usize,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            n_genes: 0,
            n_latent: 10,
            n_hidden: 128,
            n_layers: 1,
            dropout: 0.1,
            norm: Norm::Batch,
            likelihood: Likelihood::Zinb,
            dispersion: Dispersion::Gene,
            learn_library: false,
            encode_covariates: false,
            deeply_inject_covariates: true,
            n_batch: 1,
            n_design: 1,
        }
    }
}

impl VaeConfig {
    pub fn check(&self) -> Result<()> {
        check_param(self.n_genes >= 1, "n_genes", "must be at least 1")?;
        check_param(self.n_latent >= 1, "n_latent", "must be at least 1")?;
        check_param(self.n_hidden >= 1, "n_hidden", "must be at least 1")?;
        check_param(self.n_layers >= 1, "n_layers", "must be at least 1")?;
        check_param((0.0..1.0).contains(&self.dropout), "dropout", "must be in [0, 1)")?;
        check_param(self.n_batch >= 1 && self.n_design >= self.n_batch, "n_batch", "must be at least 1")
    }
}

/// One minibatch of model inputs.
pub struct Inputs {
    /// log(1 + counts), dense: the encoder's input.
    pub log1p_x: Tensor,
    pub log_library: Tensor,
    pub design: Tensor,
    pub batch: Tensor,
    /// Σ log Γ(x + 1) per cell, the likelihood's model-free term.
    pub log_factorial: Tensor,
    /// The non-zero counts, where most likelihood terms live.
    pub nonzero: SparseBatch,
}

pub struct Vae {
    pub cfg: VaeConfig,
    pub vs: nn::VarStore,
    encoder: GaussianEncoder,
    library_encoder: Option<GaussianEncoder>,
    decoder: CountDecoder,
    library_log_means: Tensor,
    library_log_vars: Tensor,
}

impl Vae {
    /// A freshly initialised model on `device` (weights from libtorch's
    /// global generator: seed it first).
    pub fn new(cfg: VaeConfig, device: Device) -> Result<Vae> {
        cfg.check()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let n_cov_enc = if cfg.encode_covariates { cfg.n_design } else { 0 };
        let enc_spec = FcSpec {
            n_in: cfg.n_genes,
            n_hidden: cfg.n_hidden,
            n_layers: cfg.n_layers,
            n_cov: n_cov_enc,
            dropout: cfg.dropout,
            norm: cfg.norm,
            inject_all: cfg.deeply_inject_covariates,
            sparse_input: false,
        };
        let encoder = GaussianEncoder::new(&(&root / "z_encoder"), enc_spec, cfg.n_latent);
        let library_encoder = cfg
            .learn_library
            .then(|| GaussianEncoder::new(&(&root / "l_encoder"), FcSpec { n_layers: 1, ..enc_spec }, 1));
        // The decoder has no dropout (scvi-tools' DecoderSCVI).
        let dec_spec = FcSpec {
            n_in: cfg.n_latent,
            n_hidden: cfg.n_hidden,
            n_layers: cfg.n_layers,
            n_cov: cfg.n_design,
            dropout: 0.0,
            norm: cfg.norm,
            inject_all: cfg.deeply_inject_covariates,
            sparse_input: false,
        };
        let decoder = CountDecoder::new(
            &root,
            CountDecoderSpec {
                stack: dec_spec,
                widths: &vec![cfg.n_hidden; cfg.n_layers],
                n_genes: cfg.n_genes,
                likelihood: cfg.likelihood,
                dispersion: cfg.dispersion,
                n_batch: cfg.n_batch,
            },
        );
        let library_log_means = root.zeros_no_train("library_log_means", &[cfg.n_batch as i64]);
        let library_log_vars = root.ones_no_train("library_log_vars", &[cfg.n_batch as i64]);
        Ok(Vae { cfg, vs, encoder, library_encoder, decoder, library_log_means, library_log_vars })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Mixed-precision training of the gene-wide products when asked and
    /// the device has native bf16 (see [`TrainConfig::bf16`]); returns
    /// whether it is on.
    pub fn set_bf16_training(&self, asked: bool) -> bool {
        let on = crate::nn::bf16_on(asked, self.device());
        self.encoder.set_bf16_training(on);
        if let Some(l) = &self.library_encoder {
            l.set_bf16_training(on);
        }
        self.decoder.set_bf16_training(on);
        on
    }

    /// Sets the per-batch prior of the learned library size from the data:
    /// mean and variance of log total counts within each batch.
    pub fn set_library_prior(&mut self, data: &VaeData) {
        let (means, vars) = data.library_prior(self.cfg.n_batch);
        tch::no_grad(|| {
            self.library_log_means.copy_(&Tensor::from_slice(&means).to_device(self.device()));
            self.library_log_vars.copy_(&Tensor::from_slice(&vars).to_device(self.device()));
        });
    }

    /// q(z | x) mean and variance; with a learned library also q(l | x).
    #[allow(clippy::type_complexity)]
    pub fn encode(&self, inp: &Inputs, pass: impl Into<Pass>) -> ((Tensor, Tensor), Option<(Tensor, Tensor)>) {
        let train = pass.into();
        let h = &inp.log1p_x;
        let cov = self.cfg.encode_covariates.then_some(&inp.design);
        let qz = self.encoder.forward(h, cov, train);
        let ql = self.library_encoder.as_ref().map(|e| e.forward(h, cov, train));
        (qz, ql)
    }

    /// The decoder's heads for latent `z`.
    pub fn decode_heads(&self, z: &Tensor, design: &Tensor, batch: &Tensor, train: impl Into<Pass>) -> DecoderHeads {
        self.decoder.heads(z, design, batch, train)
    }

    /// p(x | z, l, design) for latent `z` and log library `log_library` ([B, 1]).
    pub fn decode(
        &self,
        z: &Tensor,
        log_library: &Tensor,
        design: &Tensor,
        batch: &Tensor,
        train: impl Into<Pass>,
    ) -> Decoded {
        self.decoder.distribution(self.decoder.heads(z, design, batch, train), log_library)
    }

    /// log p(x | z, l) per cell from the decoder's heads (fused on the CPU).
    pub fn log_likelihood_heads(&self, inp: &Inputs, heads: DecoderHeads, log_library: &Tensor) -> Tensor {
        self.decoder.log_likelihood_heads(&inp.nonzero, &inp.log_factorial, heads, log_library)
    }

    /// log p(x | decoded) per cell, the full value (log Γ(x+1) included).
    pub fn log_likelihood(&self, inp: &Inputs, d: &Decoded) -> Tensor {
        self.decoder.log_likelihood(&inp.nonzero, &inp.log_factorial, d)
    }

    /// Negative ELBO terms per cell: reconstruction −log p(x | z, l), KL of
    /// z (warmed up) and KL of the library (not warmed up, as scVI).
    pub fn loss_terms(&self, inp: &Inputs, train: bool) -> LossTerms {
        let (qz, ql) = self.encode(inp, train);
        self.loss_from_posterior(inp, qz, ql, train)
    }

    /// As `loss_terms`, from the posteriors q(z | x) and q(l | x) of the cells.
    #[allow(clippy::type_complexity)]
    pub(crate) fn loss_from_posterior(
        &self,
        inp: &Inputs,
        (qm, qv): (Tensor, Tensor),
        ql: Option<(Tensor, Tensor)>,
        train: bool,
    ) -> LossTerms {
        let z = &qm + qv.sqrt() * crate::dist::randn_rows(&qm);
        let (log_library, kl_l) = match &ql {
            Some((lm, lv)) => {
                let l = lm + lv.sqrt() * crate::dist::randn_rows(lm);
                let pm = self.library_log_means.index_select(0, &inp.batch).unsqueeze(1);
                let pv = self.library_log_vars.index_select(0, &inp.batch).unsqueeze(1);
                (l, kl_normal(lm, lv, &pm, &pv).sum_dim_intlist(-1, false, Kind::Float))
            }
            None => (inp.log_library.shallow_clone(), qm.zeros_like().sum_dim_intlist(-1, false, Kind::Float)),
        };
        let heads = self.decode_heads(&z, &inp.design, &inp.batch, train);
        let reconstruction = -self.log_likelihood_heads(inp, heads, &log_library);
        let kl_z = kl_normal(&qm, &qv, &qm.zeros_like(), &qv.ones_like()).sum_dim_intlist(-1, false, Kind::Float);
        LossTerms { reconstruction, kl_warmup: kl_z, kl_fixed: kl_l, deferred: vec![], penalty: None }
    }
}

/// The counts and covariates a VAE trains on, with per-cell constants.
pub struct VaeData<'a> {
    pub counts: Rows<'a>,
    pub covariates: &'a Covariates,
    pub log_library: Vec<f32>,
    pub log_factorial: Vec<f32>,
    /// The counts on the device, when they are kept there.
    pub resident: Option<DeviceCsr>,
}

impl<'a> VaeData<'a> {
    pub fn new(counts: &'a Csr, covariates: &'a Covariates) -> VaeData<'a> {
        Self::in_memory(counts, covariates, super::log_factorial(counts))
    }

    /// As [`VaeData::new`] for passes that encode or decode but never
    /// evaluate the likelihood: Σ log x! is left at zero, not computed (one
    /// log-gamma per non-zero count).
    pub fn for_encoding(counts: &'a Csr, covariates: &'a Covariates) -> VaeData<'a> {
        Self::in_memory(counts, covariates, vec![0.0; counts.n_rows])
    }

    fn in_memory(counts: &'a Csr, covariates: &'a Covariates, log_factorial: Vec<f32>) -> VaeData<'a> {
        let log_library = counts.row_sums().iter().map(|&s| (s.max(1.0)).ln() as f32).collect();
        VaeData { counts: Rows::Memory(counts), covariates, log_library, log_factorial, resident: None }
    }

    /// Data on disk, with the per-cell totals of a pass over it.
    pub fn on_disk(counts: &'a DiskCsr, scan: &Scan, covariates: &'a Covariates) -> VaeData<'a> {
        VaeData {
            counts: Rows::Disk(counts),
            covariates,
            log_library: crate::data::log_libraries(scan),
            log_factorial: scan.log_factorial.clone(),
            resident: None,
        }
    }

    pub fn n_cells(&self) -> usize {
        self.counts.n_rows()
    }

    /// Mean and variance of the log library size within each of `n_batch`
    /// batches: the prior of a learned library (scVI, scSpecies). The
    /// variance is the population one (numpy's default, as scvi-tools
    /// computes it), at least 1e-4.
    pub fn library_prior(&self, n_batch: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut s, mut ss, mut k) = (vec![0f64; n_batch], vec![0f64; n_batch], vec![0f64; n_batch]);
        for (c, &l) in self.log_library.iter().enumerate() {
            let b = self.covariates.batch.codes[c] as usize;
            s[b] += l as f64;
            ss[b] += (l as f64).powi(2);
            k[b] += 1.0;
        }
        let mean = |b: usize| s[b] / k[b].max(1.0);
        let means = (0..n_batch).map(|b| mean(b) as f32).collect();
        let vars = (0..n_batch).map(|b| ((ss[b] / k[b].max(1.0) - mean(b).powi(2)).max(1e-4)) as f32).collect();
        (means, vars)
    }

    /// Keeps the counts on `device` and gathers minibatches there.
    pub fn keep_on(mut self, device: Device) -> Result<Self> {
        if let Some(m) = self.counts.memory() {
            self.resident = Some(DeviceCsr::new(m, device)?);
        }
        Ok(self)
    }

    /// Inputs of `rows`, with every cell's batch set to `batch_as` if given.
    pub fn inputs(&self, rows: &[usize], batch_as: Option<u32>, device: Device) -> Inputs {
        self.inputs_from(rows, batch_as, device, false)
    }

    /// `inputs` for a training step whose encoders' first products run in
    /// bf16 on the CPU ([`crate::nn::Input::DenseBf16`]): `log1p_x` is left
    /// undefined and the encoders' input comes beside it, as bf16
    /// [rows, genes + design], the counts (their log(1 + x) when `log`)
    /// with the design appended, written in one pass.
    pub fn inputs_bf16(&self, rows: &[usize], log: bool, streamed: bool) -> (Inputs, Tensor) {
        let device = Device::Cpu;
        let design = self.covariates.design(rows, None, device);
        let n_cov = design.size()[1] as usize;
        let (x, nonzero) = self.counts.with_rows(rows, streamed, |m, local| {
            let x = Tensor::empty([rows.len() as i64, (m.n_cols + n_cov) as i64], (Kind::BFloat16, device));
            // SAFETY: a fresh contiguous bf16 tensor of exactly this many
            // elements, written as its 16-bit words; the design is a
            // contiguous f32 [rows, n_cov] tensor.
            let (out, cov) = unsafe {
                (
                    std::slice::from_raw_parts_mut(x.data_ptr() as *mut u16, x.numel()),
                    std::slice::from_raw_parts(design.data_ptr() as *const f32, design.numel()),
                )
            };
            m.dense_bf16_rows_into(local, log, cov, n_cov, out);
            (x, SparseBatch::from_csr(m, local, device))
        });
        (self.with_cell_constants(rows, None, device, Tensor::new(), design, nonzero), x)
    }

    /// `Inputs` of `rows` from their counts' parts (`log1p_x`, `nonzero`)
    /// and design, with the per-cell constants: log library, batch codes
    /// (every cell's set to `batch_as` if given), log Γ(x + 1).
    fn with_cell_constants(
        &self,
        rows: &[usize],
        batch_as: Option<u32>,
        device: Device,
        log1p_x: Tensor,
        design: Tensor,
        nonzero: SparseBatch,
    ) -> Inputs {
        let pick = |v: &[f32]| Tensor::from_slice(&rows.iter().map(|&r| v[r]).collect::<Vec<f32>>()).to_device(device);
        Inputs {
            log1p_x,
            log_library: pick(&self.log_library).unsqueeze(1),
            design,
            batch: self.covariates.batch_codes(rows, batch_as, device),
            log_factorial: pick(&self.log_factorial),
            nonzero,
        }
    }

    /// `inputs`, reading on-disk cells from the epoch's stream when `streamed`.
    pub fn inputs_from(&self, rows: &[usize], batch_as: Option<u32>, device: Device, streamed: bool) -> Inputs {
        let (log1p_x, nonzero) = match &self.resident {
            Some(d) if d.device() == device => {
                let (x, nonzero) = d.rows(rows);
                (x.log1p(), nonzero)
            }
            _ => self.counts.with_rows(rows, streamed, |m, local| {
                (crate::data::log1p_rows_to_tensor(m, local, device), SparseBatch::from_csr(m, local, device))
            }),
        };
        let design = self.covariates.design(rows, batch_as, device);
        self.with_cell_constants(rows, batch_as, device, log1p_x, design, nonzero)
    }
}

/// A VAE with its training data: what the training loop drives.
pub struct VaeTask<'a> {
    pub model: &'a Vae,
    pub data: &'a VaeData<'a>,
}

impl Trainable for VaeTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.model.vs
    }

    fn n_cells(&self) -> usize {
        self.data.n_cells()
    }

    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        self.model.loss_terms(&self.data.inputs_from(rows, None, self.model.device(), train), train)
    }

    fn split(&self, validation_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        match self.data.counts {
            Rows::Disk(d) => d.split(validation_fraction, seed),
            Rows::Memory(_) => crate::data::train_validation_split(self.n_cells(), validation_fraction, seed),
        }
    }

    fn epoch_order(&self, rows: &mut Vec<usize>, seed: u64) {
        match self.data.counts {
            Rows::Disk(d) => *rows = d.epoch_order(rows, seed, crate::dist::current().map(|g| (g.rank(), g.world()))),
            Rows::Memory(_) => rows.shuffle(&mut ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    fn end_epoch(&self) {
        if let Rows::Disk(d) = self.data.counts {
            d.end_stream();
        }
    }
}

/// Query training of a mapped VAE whose encoders read no covariates: they
/// are frozen, so q(z | x) and q(l | x) of every query cell are computed
/// once (no dropout, batch-norm statistics as trained: the posteriors
/// `latent()` reads; scvi-tools' `freeze_dropout = True`) and each step
/// runs the decoder only.
struct FrozenEncoderTask<'a> {
    model: &'a Vae,
    data: &'a VaeData<'a>,
    qz: (Tensor, Tensor),
    ql: Option<(Tensor, Tensor)>,
}

impl<'a> FrozenEncoderTask<'a> {
    fn new(model: &'a Vae, data: &'a VaeData<'a>) -> FrozenEncoderTask<'a> {
        let n = data.n_cells();
        let (mut zm, mut zv, mut lm, mut lv) = (vec![], vec![], vec![], vec![]);
        tch::no_grad(|| {
            for start in (0..n).step_by(1024) {
                let rows: Vec<usize> = (start..(start + 1024).min(n)).collect();
                let ((m, v), l) = model.encode(&data.inputs(&rows, None, model.device()), Pass::Eval);
                zm.push(m);
                zv.push(v);
                if let Some((m, v)) = l {
                    lm.push(m);
                    lv.push(v);
                }
            }
        });
        let ql = (!lm.is_empty()).then(|| (Tensor::cat(&lm, 0), Tensor::cat(&lv, 0)));
        FrozenEncoderTask { model, data, qz: (Tensor::cat(&zm, 0), Tensor::cat(&zv, 0)), ql }
    }
}

impl Trainable for FrozenEncoderTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.model.vs
    }

    fn n_cells(&self) -> usize {
        self.data.n_cells()
    }

    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        let dev = self.model.device();
        let idx = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(dev);
        let pick = |(m, v): &(Tensor, Tensor)| (m.index_select(0, &idx), v.index_select(0, &idx));
        let inp = self.data.inputs(rows, None, dev);
        self.model.loss_from_posterior(&inp, pick(&self.qz), self.ql.as_ref().map(pick), train)
    }
}

/// Everything a trained VAE needs to be used again: the architecture, the
/// genes and covariate levels it was trained on, how it was trained.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeMeta {
    pub config: VaeConfig,
    pub genes: Vec<String>,
    pub batch_name: String,
    pub batch_levels: Vec<String>,
    pub categorical: Vec<(String, Vec<String>)>,
    pub continuous: Vec<String>,
    /// Batches added by `map_query()` (the last levels of `batch_levels`).
    #[serde(default)]
    pub query_batches: Vec<String>,
    #[serde(flatten)]
    pub training: TrainingRecord,
    /// Joint fine-tuning with a clustering (`models::joint`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tuned: Option<crate::models::joint::JointRecord>,
}

/// A trained VAE and its description.
pub struct VaeModel {
    pub meta: VaeMeta,
    pub vae: Vae,
}

impl std::fmt::Debug for VaeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaeModel").field("config", &self.meta.config).finish_non_exhaustive()
    }
}

impl VaeModel {
    /// Builds and trains a VAE on `counts` with covariates `cov`. The
    /// architecture's data-dependent sizes are filled in from the data;
    /// `train.max_epochs == 0` means scvi-tools' default for this many cells.
    pub fn fit(
        counts: &CountMatrix,
        cov: &Covariates,
        config: VaeConfig,
        train_cfg: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<VaeModel> {
        let data = VaeData::new(&counts.csr, cov);
        Self::fit_data(data, &counts.genes, config, train_cfg, device, interrupted, on_epoch)
    }

    /// `fit` on counts that stay on disk: minibatches are streamed from the
    /// file (see `data::DiskCsr`); `scan` is the file's pass of per-cell totals.
    #[allow(clippy::too_many_arguments)]
    pub fn fit_on_disk(
        counts: &DiskCsr,
        scan: &Scan,
        genes: &[String],
        cov: &Covariates,
        config: VaeConfig,
        train_cfg: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<VaeModel> {
        if genes.len() != counts.n_cols() || scan.row_sums.len() != counts.n_rows() {
            return invalid!(
                "{} gene names and {} scanned cells for a {} x {} matrix",
                genes.len(),
                scan.row_sums.len(),
                counts.n_rows(),
                counts.n_cols()
            );
        }
        Self::fit_data(VaeData::on_disk(counts, scan, cov), genes, config, train_cfg, device, interrupted, on_epoch)
    }

    fn fit_data(
        mut data: VaeData,
        genes: &[String],
        mut config: VaeConfig,
        mut train_cfg: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<VaeModel> {
        let (counts, cov) = (data.counts, data.covariates);
        let n_cells = counts.n_rows();
        if cov.n_cells() != n_cells {
            return invalid!("{} covariate values for {} cells", cov.n_cells(), n_cells);
        }
        config.n_genes = counts.n_cols();
        config.n_batch = cov.batch.n_levels();
        config.n_design = cov.n_design();
        if train_cfg.max_epochs == 0 {
            train_cfg.max_epochs = default_max_epochs(n_cells);
        }
        // Every check before the global generator is seeded: a refused call
        // leaves libtorch's random state as it was.
        config.check()?;
        train_cfg.check()?;
        seed_torch(train_cfg.seed);
        let mut vae = Vae::new(config.clone(), device)?;
        train_cfg.bf16 = vae.set_bf16_training(train_cfg.bf16);
        // On a GPU, keep the counts there when they take at most 8 GiB.
        if let Some(m) = counts.memory() {
            if device != Device::Cpu && DeviceCsr::bytes(m.nnz(), n_cells) <= RESIDENT_MAX_BYTES {
                data = data.keep_on(device)?;
            }
        }
        if config.learn_library {
            vae.set_library_prior(&data);
        }
        let history = train(&VaeTask { model: &vae, data: &data }, &train_cfg, interrupted, on_epoch)?;
        let meta = VaeMeta {
            config,
            genes: genes.to_vec(),
            batch_name: cov.batch.name.clone(),
            batch_levels: cov.batch.levels.clone(),
            categorical: cov.categorical.iter().map(|c| (c.name.clone(), c.levels.clone())).collect(),
            continuous: cov.continuous.iter().map(|c| c.0.clone()).collect(),
            query_batches: vec![],
            training: TrainingRecord::new(train_cfg, history, n_cells),
            fine_tuned: None,
        };
        Ok(VaeModel { meta, vae })
    }

    /// The model as a model file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        io::model_to_bytes(&self.vae.vs, "vae", &self.meta)
    }

    /// Reads a model written by `to_bytes` onto `device`.
    pub fn from_bytes(bytes: &[u8], device: Device) -> Result<VaeModel> {
        let (meta, tensors): (VaeMeta, _) = io::model_from_bytes(bytes, "vae", "a VAE")?;
        io::check_meta("genes", meta.genes.len(), meta.config.n_genes)?;
        io::check_meta("batches", meta.batch_levels.len(), meta.config.n_batch)?;
        let vae = Vae::new(meta.config.clone(), device)?;
        io::load_into(&vae.vs, &tensors)?;
        Ok(VaeModel { meta, vae })
    }

    /// The model mapped onto query cells whose batches are all new (see
    /// `crate::mapping`): the design vector gains one column per new batch
    /// in every layer that reads it, per-batch parameters gain entries, and
    /// training on the query changes only those (and, as an option, the
    /// decoder's first layer). The encoder of a model that does not encode
    /// covariates is left as it was, so every cell's latent space is too,
    /// and is evaluated once per query cell rather than at every step.
    pub fn map_query_cells(
        &self,
        cells: Cells,
        opts: &MapOptions,
        mut train_cfg: TrainConfig,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<VaeModel> {
        let n = cells.n_cells();
        let Cells { mut counts, batch, categorical, continuous } = cells;
        if counts.len() != 1 {
            return invalid!("a VAE reads one count matrix; got {}", counts.len());
        }
        let csr = self.align_genes(counts.remove(0))?;
        let Some(batch) = batch else {
            return invalid!(
                "give the batch of the query cells (`batch =`): each of their batches becomes a new batch of the model"
            );
        };
        let new = new_levels(&self.meta.batch_levels, &batch, &self.meta.batch_name)?;
        let cats = self.given_categorical(categorical)?;
        let mut meta = self.meta.clone();
        meta.batch_levels.extend(new.iter().cloned());
        meta.query_batches.extend(new.iter().cloned());
        meta.config.n_batch += new.len();
        meta.config.n_design += new.len();
        let cov = meta.covariates_for(n, Some(&batch), &cats, continuous, true)?;
        if train_cfg.max_epochs == 0 {
            train_cfg.max_epochs = default_max_epochs(n);
        }
        train_cfg.check()?;
        let device = self.vae.device();
        seed_torch(train_cfg.seed);
        let mut vae = Vae::new(meta.config.clone(), device)?;
        train_cfg.bf16 = vae.set_bf16_training(train_cfg.bf16);
        // The design vector is [batch one-hot, further categories, continuous]
        // at the end of a layer's input: new batch columns go after the old ones.
        let n_batch = self.meta.config.n_batch as i64;
        let rest = self.meta.config.n_design as i64 - n_batch;
        let first_layer = opts.train_decoder_first_layer;
        let frozen = transplant(
            &self.vae.vs,
            &vae.vs,
            &|name, old| {
                if name.ends_with(".weight") || name.ends_with(".weight_t") {
                    (old - rest, old - rest - n_batch)
                } else {
                    (old, 0)
                }
            },
            &|name| first_layer && name.starts_with("decoder.layer0.linear."),
        )?;
        let mut data = VaeData::new(&csr, &cov);
        if device != Device::Cpu && DeviceCsr::bytes(csr.nnz(), n) <= RESIDENT_MAX_BYTES {
            data = data.keep_on(device)?;
        }
        if meta.config.learn_library {
            // The new batches' library prior from the query; the others' stay.
            vae.set_library_prior(&data);
            frozen.restore();
        }
        let history = if meta.config.encode_covariates {
            let task = VaeTask { model: &vae, data: &data };
            train(&FrozenTask { inner: &task, frozen: &frozen }, &train_cfg, interrupted, on_epoch)?
        } else {
            let task = FrozenEncoderTask::new(&vae, &data);
            train(&FrozenTask { inner: &task, frozen: &frozen }, &train_cfg, interrupted, on_epoch)?
        };
        meta.training = TrainingRecord::new(train_cfg, history, n);
        Ok(VaeModel { meta, vae })
    }

    /// The labels of every further categorical covariate of the model: each
    /// must be given.
    pub fn given_categorical(&self, categorical: Vec<Option<Vec<String>>>) -> Result<Vec<Vec<String>>> {
        categorical
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                c.ok_or_else(|| {
                    let name = self.meta.categorical.get(i).map_or("?", |c| c.0.as_str());
                    crate::Error::InvalidInput(format!("the model uses covariate `{name}`: give it for the cells"))
                })
            })
            .collect()
    }

    /// The columns of `counts` in the model's gene order. Genes the model
    /// does not know are ignored; genes it needs but `counts` lacks are an error.
    pub fn align_genes(&self, counts: CountMatrix) -> Result<Csr> {
        let keep = counts.columns_of(&self.meta.genes, "")?;
        Ok(counts.into_columns(&keep))
    }

    /// Covariates for computations that do not use them (the encoder of a
    /// model that does not encode covariates): every cell at the first level.
    pub fn neutral_covariates(&self, n_cells: usize) -> Covariates {
        let m = &self.meta;
        let cat = |name: &str, levels: &[String]| Categorical {
            name: name.to_string(),
            codes: vec![0; n_cells],
            levels: levels.to_vec(),
        };
        Covariates {
            batch: cat(&m.batch_name, &m.batch_levels),
            categorical: m.categorical.iter().map(|(n, l)| cat(n, l)).collect(),
            continuous: m.continuous.iter().map(|n| (n.clone(), vec![0.0; n_cells])).collect(),
        }
    }

    /// Covariates of new cells from their labels (see `VaeMeta::covariates_for`).
    pub fn covariates_for(
        &self,
        n_cells: usize,
        batch: Option<&[String]>,
        categorical: &[Vec<String>],
        continuous: Vec<Vec<f32>>,
        batch_needed: bool,
    ) -> Result<Covariates> {
        self.meta.covariates_for(n_cells, batch, categorical, continuous, batch_needed)
    }
}

impl VaeMeta {
    /// Covariates of new cells from their labels: each label must be a level
    /// the model was trained with. `batch = None` is allowed only for a model
    /// with a single batch (or where the batch is irrelevant, `batch_needed` false).
    pub fn covariates_for(
        &self,
        n_cells: usize,
        batch: Option<&[String]>,
        categorical: &[Vec<String>],
        continuous: Vec<Vec<f32>>,
        batch_needed: bool,
    ) -> Result<Covariates> {
        let from_labels = |name: &str, labels: &[String], levels: &[String]| -> Result<Categorical> {
            let at: HashMap<&str, u32> = levels.iter().enumerate().map(|(i, l)| (l.as_str(), i as u32)).collect();
            let mut codes = Vec::with_capacity(labels.len());
            for l in labels {
                match at.get(l.as_str()) {
                    Some(&c) => codes.push(c),
                    None => {
                        return invalid!(
                            "`{name}` value '{l}' was not seen in training (levels: {})",
                            levels.iter().map(|l| format!("'{l}'")).collect::<Vec<_>>().join(", ")
                        )
                    }
                }
            }
            Categorical::new(name, codes, levels.to_vec(), n_cells, 0)
        };
        let m = self;
        let batch = match batch {
            Some(labels) => from_labels(&m.batch_name, labels, &m.batch_levels)?,
            None if m.batch_levels.len() == 1 || !batch_needed => {
                Categorical { name: m.batch_name.clone(), codes: vec![0; n_cells], levels: m.batch_levels.clone() }
            }
            None => {
                return invalid!(
                    "the model was trained on {} batches: give the batch of the new cells (`batch =`)",
                    m.batch_levels.len()
                )
            }
        };
        if categorical.len() != m.categorical.len() || continuous.len() != m.continuous.len() {
            return invalid!(
                "the model was trained with {} categorical and {} continuous covariates; give the same for the new cells",
                m.categorical.len(),
                m.continuous.len()
            );
        }
        let cats = m
            .categorical
            .iter()
            .zip(categorical)
            .map(|((name, levels), labels)| from_labels(name, labels, levels))
            .collect::<Result<Vec<_>>>()?;
        Covariates::new(batch, cats, m.continuous.iter().cloned().zip(continuous).collect())
    }
}

mod fitted;
pub mod infer;

#[cfg(test)]
#[path = "vae_tests.rs"]
mod tests;
