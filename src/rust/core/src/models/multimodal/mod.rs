//! Multimodal VAE (RNA + ATAC, or any paired count modalities) with the
//! priors of regularizedvi (Kleshchevnikov et al.), which keep large models
//! well behaved without per-data-set tuning. With one modality it is the
//! regularized single-modality model.
//!
//! Per modality m with features g, for a cell with latent z and library ℓ_m:
//!   x_mg ~ NB(μ_mg, θ_mg),  μ_mg = exp(ℓ_m) · (softplus(f_m(z, c))_g + s_mg) · y_mg
//! - f_m: the modality's decoder; it sees the whole z (and the decoder
//!   conditioning covariates c, none by default: batch acts through s, y, θ, ℓ).
//! - s: ambient background exp(β) per feature × ambient level, started at
//!   0.2 × the level's mean normalized expression; optional Gamma(1, 100) prior.
//! - y: feature scaling softplus(γ)/0.7 per feature × scaling level, prior
//!   Gamma(200, 200) (so y stays near 1 unless the data insist).
//! - θ: variational LogNormal per feature × dispersion level; prior
//!   1/√θ ~ Exp(λ) ("containment": favours small overdispersion), λ a point
//!   estimate per level with a Gamma(9, 3) prior. As in regularizedvi, the
//!   penalty is −H[q(log θ)] − log Exp(θ^(−1/2); λ) at a fresh draw (no
//!   Jacobian term). θ is drawn per cell and feature while training; its
//!   posterior mean exp(μ + σ²/2) is used otherwise.
//! - ℓ: learned by a library encoder per modality (one layer of 16 units),
//!   prior N(mean, 0.5 · var) of the log library sizes of the cell's library
//!   level; or observed.
//! - A ridge penalty 0.1 · ΣW² on the decoders' weights (biases excluded).
//!
//! Global terms (the priors of s, y, θ, λ, the entropy of q(θ) and the
//! ridge) are summed once and divided by the number of training cells, so
//! that the minibatch mean of the per-cell losses is an unbiased estimate of
//! the negative ELBO (plus the penalties) divided by that number.

use crate::data::{Categorical, Csr, DiskCsr, Rows, Scan};
use crate::error::{check_param, invalid, Result};
use crate::likelihood::{fused_softplus_rows, nb_log_kernel_rows, PerLevel, SoftplusDecoded, SparseBatch};
use crate::nn::{kl_normal, linear, Deferred, FcLayers, FcSpec, GaussianEncoder, Input, Norm, Pass, SparseInput};
use crate::train::{LossTerms, Trainable};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::rc::Rc;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Share of a level's mean normalized expression the ambient term starts at.
pub const AMBIENT_INIT_FRACTION: f64 = 0.2;
/// Gamma(shape, rate) prior of the ambient background s, when asked for.
pub const AMBIENT_PRIOR: (f64, f64) = (1.0, 100.0);
/// Gamma(shape, rate) prior of the feature scaling y.
pub const SCALING_PRIOR: (f64, f64) = (200.0, 200.0);
/// y = softplus(γ) / SCALING_DIVISOR, so γ = 0 gives y ≈ 0.99.
pub const SCALING_DIVISOR: f64 = 0.7;
/// Gamma(shape, rate) hyperprior of λ, the rate of the containment prior
/// 1/√θ ~ Exp(λ) (mean 3).
pub const DISPERSION_RATE_PRIOR: (f64, f64) = (9.0, 3.0);
/// Initial log-mean (log 9: θ = λ0² with λ0 = 3) and log-sd (log 0.1) of
/// the variational LogNormal of θ.
pub const THETA_INIT: (f64, f64) = (2.197_224_577_336_219_6, -std::f64::consts::LN_10);
/// Units of the library encoders' hidden layer.
pub const LIBRARY_HIDDEN: usize = 16;

/// How the per-modality posteriors make the joint latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    /// z = (z_1, …, z_M): each modality contributes its own dimensions.
    Concatenate,
    /// z is the weighted mean of the modalities' posteriors (same width):
    /// means and variances averaged with `modality_weights`.
    Mean,
}

impl Combine {
    pub fn parse(s: &str) -> Option<Combine> {
        match s {
            "concatenate" => Some(Combine::Concatenate),
            "mean" => Some(Combine::Mean),
            _ => None,
        }
    }
}

/// One modality of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModalitySpec {
    pub name: String,
    pub n_features: usize,
    pub n_latent: usize,
    pub n_hidden: usize,
    /// Additive ambient background (usually RNA only).
    pub ambient: bool,
    /// Multiplicative feature scaling (usually ATAC only).
    pub feature_scaling: bool,
    /// Weight of the modality in `Combine::Mean`.
    pub weight: f64,
}

impl Default for ModalitySpec {
    fn default() -> Self {
        ModalitySpec {
            name: String::new(),
            n_features: 0,
            n_latent: 10,
            n_hidden: 128,
            ambient: false,
            feature_scaling: false,
            weight: 1.0,
        }
    }
}

/// Architecture of a multimodal model; saved with the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MultimodalConfig {
    pub modalities: Vec<ModalitySpec>,
    pub combine: Combine,
    pub n_layers: usize,
    pub dropout: f64,
    pub norm: Norm,
    pub learn_library: bool,
    /// Variance of the library prior relative to the data's (0.5).
    pub library_prior_scale: f64,
    pub ambient_prior: bool,
    /// Weight of the ridge penalty on the decoders' weights.
    pub decoder_l2: f64,
    /// Levels of the ambient, scaling, dispersion and library covariates.
    pub n_ambient: usize,
    pub n_scaling: usize,
    pub n_dispersion: usize,
    pub n_library: usize,
    /// Widths of the one-hot decoder-conditioning and encoder covariates.
    pub n_decoder_cov: usize,
    pub n_encoder_cov: usize,
}

impl Default for MultimodalConfig {
    fn default() -> Self {
        MultimodalConfig {
            modalities: vec![],
            combine: Combine::Concatenate,
            n_layers: 1,
            dropout: 0.1,
            norm: Norm::Layer,
            learn_library: true,
            library_prior_scale: 0.5,
            ambient_prior: false,
            decoder_l2: 0.1,
            n_ambient: 1,
            n_scaling: 1,
            n_dispersion: 1,
            n_library: 1,
            n_decoder_cov: 0,
            n_encoder_cov: 0,
        }
    }
}

impl MultimodalConfig {
    pub fn check(&self) -> Result<()> {
        check_param(!self.modalities.is_empty(), "modalities", "must name at least one modality")?;
        for m in &self.modalities {
            check_param(m.n_features >= 1, "n_features", "must be at least 1 per modality")?;
            check_param(m.n_latent >= 1, "n_latent", "must be at least 1")?;
            check_param(m.n_hidden >= 1, "n_hidden", "must be at least 1")?;
            check_param(m.weight > 0.0 && m.weight.is_finite(), "modality_weights", "must be positive")?;
        }
        if self.combine == Combine::Mean {
            let d = self.modalities[0].n_latent;
            check_param(
                self.modalities.iter().all(|m| m.n_latent == d),
                "n_latent",
                "must be the same for every modality when combine = \"mean\"",
            )?;
        }
        check_param(self.n_layers >= 1, "n_layers", "must be at least 1")?;
        check_param((0.0..1.0).contains(&self.dropout), "dropout", "must be in [0, 1)")?;
        check_param(self.library_prior_scale > 0.0, "library_prior_scale", "must be positive")?;
        check_param(self.decoder_l2 >= 0.0, "decoder_l2", "must be non-negative")?;
        check_param(
            self.n_ambient >= 1 && self.n_scaling >= 1 && self.n_dispersion >= 1 && self.n_library >= 1,
            "covariates",
            "need at least one level each",
        )
    }

    /// Width of the joint latent space.
    pub fn n_latent(&self) -> usize {
        match self.combine {
            Combine::Concatenate => self.modalities.iter().map(|m| m.n_latent).sum(),
            Combine::Mean => self.modalities[0].n_latent,
        }
    }
}

/// The covariates a multimodal model uses, each a categorical of the cells.
#[derive(Debug, Clone)]
pub struct MultimodalCovariates {
    pub ambient: Categorical,
    pub scaling: Categorical,
    pub dispersion: Categorical,
    pub library: Categorical,
    /// One-hot inputs of every decoder layer (none by default).
    pub decoder: Vec<Categorical>,
    /// One-hot inputs of the encoders' first layer (none by default).
    pub encoder: Vec<Categorical>,
}

impl MultimodalCovariates {
    /// Every key at one level: a model without covariates.
    pub fn none(n_cells: usize) -> Self {
        let c = |n: &str| Categorical::constant(n, n_cells);
        MultimodalCovariates {
            ambient: c("ambient"),
            scaling: c("scaling"),
            dispersion: c("dispersion"),
            library: c("library"),
            decoder: vec![],
            encoder: vec![],
        }
    }

    pub fn n_cells(&self) -> usize {
        self.ambient.codes.len()
    }

    fn width(cats: &[Categorical]) -> usize {
        cats.iter().map(|c| c.n_levels()).sum()
    }

    fn one_hots(cats: &[Categorical], rows: &[usize], device: Device) -> Option<Tensor> {
        (!cats.is_empty()).then(|| Tensor::cat(&cats.iter().map(|c| c.one_hot(rows, device)).collect::<Vec<_>>(), 1))
    }

    fn check(&self) -> Result<()> {
        let n = self.n_cells();
        for c in [&self.scaling, &self.dispersion, &self.library].into_iter().chain(&self.decoder).chain(&self.encoder)
        {
            if c.codes.len() != n {
                return invalid!("`{}` has {} values for {n} cells", c.name, c.codes.len());
            }
        }
        Ok(())
    }
}

/// An encoder's input, log(1 + counts): on the CPU as sparse columns with
/// the encoder covariates appended (read by the transposed first layer),
/// elsewhere a dense tensor (the covariates apart, in `MmInputs`).
pub enum EncoderInput {
    Dense(Tensor),
    Sparse(Rc<SparseInput>),
}

/// One minibatch.
pub struct MmInputs {
    /// The encoders' input per modality.
    pub encoder_input: Vec<EncoderInput>,
    pub nonzero: Vec<SparseBatch>,
    pub log_library: Vec<Tensor>,
    pub log_factorial: Vec<Tensor>,
    pub ambient: Tensor,
    pub scaling: Tensor,
    pub dispersion: Tensor,
    pub library: Tensor,
    pub decoder_cov: Option<Tensor>,
    pub encoder_cov: Option<Tensor>,
}

/// The paired counts (one matrix per modality, same cells, in memory or
/// on disk) and covariates.
pub struct MultimodalData<'a> {
    pub counts: Vec<Rows<'a>>,
    pub cov: &'a MultimodalCovariates,
    pub log_library: Vec<Vec<f32>>,
    pub log_factorial: Vec<Vec<f32>>,
}

/// Cells read at once by the passes over on-disk modalities.
const PASS_CELLS: usize = 16_384;

impl<'a> MultimodalData<'a> {
    pub fn new(counts: Vec<&'a Csr>, cov: &'a MultimodalCovariates) -> Result<MultimodalData<'a>> {
        let log_library =
            counts.iter().map(|c| c.row_sums().iter().map(|&s| (s.max(1.0)).ln() as f32).collect()).collect();
        let log_factorial = counts.iter().map(|c| super::log_factorial(c)).collect();
        Self::checked(counts.into_iter().map(Rows::Memory).collect(), cov, log_library, log_factorial)
    }

    /// Modalities on disk (the same cells in the same order in each), with
    /// each one's pass of per-cell totals. Their epochs are streamed in
    /// step: every modality gets the same blocks and windows (the smallest
    /// window any of them asks for), so one order serves them all.
    pub fn on_disk(disks: &[&'a DiskCsr], scans: &[Scan], cov: &'a MultimodalCovariates) -> Result<MultimodalData<'a>> {
        if scans.len() != disks.len() {
            return invalid!("internal: {} scans for {} modalities on disk", scans.len(), disks.len());
        }
        if disks.iter().any(|d| d.window_blocks != disks[0].window_blocks || d.block != disks[0].block) {
            return invalid!("internal: modalities on disk must be read in step (see `DiskCsr::in_step`)");
        }
        let log_library = scans.iter().map(crate::data::log_libraries).collect();
        let log_factorial = scans.iter().map(|s| s.log_factorial.clone()).collect();
        Self::checked(disks.iter().map(|&d| Rows::Disk(d)).collect(), cov, log_library, log_factorial)
    }

    fn checked(
        counts: Vec<Rows<'a>>,
        cov: &'a MultimodalCovariates,
        log_library: Vec<Vec<f32>>,
        log_factorial: Vec<Vec<f32>>,
    ) -> Result<MultimodalData<'a>> {
        cov.check()?;
        let n = cov.n_cells();
        if let Some(c) = counts.iter().find(|c| c.n_rows() != n) {
            return invalid!("a modality has {} cells where the covariates have {n}", c.n_rows());
        }
        Ok(MultimodalData { counts, cov, log_library, log_factorial })
    }

    pub fn n_cells(&self) -> usize {
        self.cov.n_cells()
    }

    /// The modalities on disk (empty for data in memory).
    fn disks(&self) -> Vec<&'a DiskCsr> {
        self.counts.iter().filter_map(|c| if let Rows::Disk(d) = c { Some(*d) } else { None }).collect()
    }

    pub fn inputs(&self, rows: &[usize], device: Device) -> MmInputs {
        self.inputs_from(rows, device, false)
    }

    /// `inputs`, reading on-disk cells from the epoch's stream when `streamed`.
    pub fn inputs_from(&self, rows: &[usize], device: Device, streamed: bool) -> MmInputs {
        let pick = |v: &[f32]| Tensor::from_slice(&rows.iter().map(|&r| v[r]).collect::<Vec<f32>>()).to_device(device);
        let codes = |c: &Categorical| {
            Tensor::from_slice(&rows.iter().map(|&r| c.codes[r] as i64).collect::<Vec<i64>>()).to_device(device)
        };
        let (encoder_input, nonzero) = self
            .counts
            .iter()
            .map(|c| {
                c.with_rows(rows, streamed, |m, local| {
                    let input = match device {
                        Device::Cpu => {
                            EncoderInput::Sparse(Rc::new(SparseInput::log1p_rows_at(m, local, rows, &self.cov.encoder)))
                        }
                        _ => EncoderInput::Dense(crate::data::log1p_rows_to_tensor(m, local, device)),
                    };
                    (input, SparseBatch::from_csr(m, local, device))
                })
            })
            .unzip();
        MmInputs {
            encoder_input,
            nonzero,
            log_library: self.log_library.iter().map(|l| pick(l).unsqueeze(1)).collect(),
            log_factorial: self.log_factorial.iter().map(|l| pick(l)).collect(),
            ambient: codes(&self.cov.ambient),
            scaling: codes(&self.cov.scaling),
            dispersion: codes(&self.cov.dispersion),
            library: codes(&self.cov.library),
            decoder_cov: MultimodalCovariates::one_hots(&self.cov.decoder, rows, device),
            encoder_cov: MultimodalCovariates::one_hots(&self.cov.encoder, rows, device),
        }
    }

    /// Per modality and ambient level, the mean over the level's cells of
    /// each feature's normalized expression x / library: [levels, features].
    /// A modality on disk is read once, in blocks of cells.
    fn mean_normalized(&self, m: usize, levels: &Categorical) -> Result<Vec<Vec<f64>>> {
        let n_cols = self.counts[m].n_cols();
        let mut sums = vec![vec![0f64; n_cols]; levels.n_levels()];
        let mut k = vec![0f64; levels.n_levels()];
        let mut add = |first: usize, c: &Csr| {
            for local in 0..c.n_rows {
                let r = first + local;
                let lv = levels.codes[r] as usize;
                let lib = (self.log_library[m][r] as f64).exp();
                let (idx, val) = c.row(local);
                for (&j, &v) in idx.iter().zip(val) {
                    sums[lv][j as usize] += v as f64 / lib;
                }
                k[lv] += 1.0;
            }
        };
        match self.counts[m] {
            Rows::Memory(c) => add(0, c),
            Rows::Disk(d) => {
                for start in (0..d.n_rows()).step_by(PASS_CELLS) {
                    add(start, &d.read_range(start, (start + PASS_CELLS).min(d.n_rows()))?);
                }
            }
        }
        sums.iter_mut().zip(&k).for_each(|(s, &k)| s.iter_mut().for_each(|v| *v /= k.max(1.0)));
        Ok(sums)
    }
}

/// Networks and parameters of one modality.
struct ModalityNet {
    encoder: GaussianEncoder,
    library_encoder: Option<GaussianEncoder>,
    decoder: FcLayers,
    head: nn::Linear,
    /// β: log ambient background, [ambient levels, features].
    ambient: Option<Tensor>,
    /// γ: raw feature scaling, [scaling levels, features].
    scaling: Option<Tensor>,
    /// Variational LogNormal of θ: log-mean and log of the log-sd, [levels, features].
    theta_mu: Tensor,
    theta_log_sigma: Tensor,
    /// softplus⁻¹ λ of the containment prior, per dispersion level.
    lambda_raw: Tensor,
    library_means: Tensor,
    library_vars: Tensor,
}

pub struct Multimodal {
    pub cfg: MultimodalConfig,
    pub vs: nn::VarStore,
    nets: Vec<ModalityNet>,
    /// Number of training cells: divides the global terms.
    pub n_obs: f64,
}

/// Rows `codes` of a [levels, features] tensor, one per cell; a single
/// level stays [1, features] and broadcasts (no copy per cell).
fn per_level(t: &Tensor, codes: &Tensor) -> Tensor {
    if t.size()[0] == 1 {
        t.shallow_clone()
    } else {
        t.index_select(0, codes)
    }
}

fn gamma_log_prob(x: &Tensor, shape: f64, rate: f64) -> Tensor {
    // log Γ(x; a, b) = a log b − log Γ(a) + (a − 1) log x − b x
    let c = shape * rate.ln() - statrs::function::gamma::ln_gamma(shape);
    x.log() * (shape - 1.0) - x * rate + c
}

impl Multimodal {
    pub fn new(cfg: MultimodalConfig, device: Device) -> Result<Multimodal> {
        cfg.check()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let n_z = cfg.n_latent();
        let nets = cfg
            .modalities
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let p = &root / format!("m{i}");
                let enc_spec = FcSpec {
                    n_in: m.n_features,
                    n_hidden: m.n_hidden,
                    n_layers: cfg.n_layers,
                    n_cov: cfg.n_encoder_cov,
                    dropout: cfg.dropout,
                    norm: cfg.norm,
                    inject_all: false,
                    sparse_input: true,
                };
                let encoder = GaussianEncoder::new(&(&p / "z_encoder"), enc_spec, m.n_latent);
                let library_encoder = cfg.learn_library.then(|| {
                    let spec = FcSpec { n_layers: 1, n_hidden: LIBRARY_HIDDEN, ..enc_spec };
                    GaussianEncoder::new(&(&p / "l_encoder"), spec, 1)
                });
                let dec_spec = FcSpec {
                    n_in: n_z,
                    n_hidden: m.n_hidden,
                    n_layers: cfg.n_layers,
                    n_cov: cfg.n_decoder_cov,
                    dropout: 0.0,
                    norm: cfg.norm,
                    inject_all: true,
                    sparse_input: false,
                };
                let g = m.n_features as i64;
                ModalityNet {
                    encoder,
                    library_encoder,
                    decoder: FcLayers::new(&(&p / "decoder"), dec_spec),
                    head: linear(&p / "head", m.n_hidden, m.n_features),
                    ambient: m.ambient.then(|| p.zeros("ambient", &[cfg.n_ambient as i64, g])),
                    scaling: m.feature_scaling.then(|| p.zeros("scaling", &[cfg.n_scaling as i64, g])),
                    theta_mu: p.var("theta_mu", &[cfg.n_dispersion as i64, g], nn::Init::Const(THETA_INIT.0)),
                    theta_log_sigma: p.var(
                        "theta_log_sigma",
                        &[cfg.n_dispersion as i64, g],
                        nn::Init::Const(THETA_INIT.1),
                    ),
                    lambda_raw: p.var(
                        "lambda_raw",
                        &[cfg.n_dispersion as i64, 1],
                        nn::Init::Const((DISPERSION_RATE_PRIOR.0 / DISPERSION_RATE_PRIOR.1).exp_m1().ln()),
                    ),
                    library_means: p.zeros_no_train("library_means", &[cfg.n_library as i64]),
                    library_vars: p.ones_no_train("library_vars", &[cfg.n_library as i64]),
                }
            })
            .collect();
        Ok(Multimodal { cfg, vs, nets, n_obs: 1.0 })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Data-dependent starting values and priors: the ambient background at
    /// 0.2 × each level's mean normalized expression, the decoder's output
    /// bias so that softplus(f) starts at the rest (0.8 × the overall mean),
    /// the library prior per library level and the library encoder's start.
    pub fn init_from_data(&mut self, data: &MultimodalData) -> Result<()> {
        let dev = self.device();
        for (m, net) in self.nets.iter_mut().enumerate() {
            let overall = data.mean_normalized(m, &Categorical::constant("all", data.n_cells()))?.swap_remove(0);
            let floor = 1e-8;
            let share = if net.ambient.is_some() { 1.0 - AMBIENT_INIT_FRACTION } else { 1.0 };
            // softplus⁻¹(v) = log(expm1(v)), written stably for small v.
            let bias: Vec<f32> = overall
                .iter()
                .map(|&v| {
                    let v = (share * v).max(floor);
                    (if v > 20.0 { v } else { v.exp_m1().ln() }) as f32
                })
                .collect();
            tch::no_grad(|| {
                net.head.bs.as_mut().expect("head has a bias").copy_(&Tensor::from_slice(&bias).to_device(dev));
            });
            if let Some(beta) = &mut net.ambient {
                let per_level = data.mean_normalized(m, &data.cov.ambient)?;
                let init: Vec<f32> = per_level
                    .iter()
                    .flat_map(|lv| lv.iter().map(|&v| (AMBIENT_INIT_FRACTION * v).max(floor).ln() as f32))
                    .collect();
                let shape = beta.size();
                tch::no_grad(|| beta.copy_(&Tensor::from_slice(&init).view(shape.as_slice()).to_device(dev)));
            }
            let n = self.cfg.n_library;
            let (mut s, mut ss, mut k) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
            for (c, &l) in data.log_library[m].iter().enumerate() {
                let b = data.cov.library.codes[c] as usize;
                s[b] += l as f64;
                ss[b] += (l as f64).powi(2);
                k[b] += 1.0;
            }
            let means: Vec<f32> = (0..n).map(|b| (s[b] / k[b].max(1.0)) as f32).collect();
            // The library encoder starts at the modality's mean log library
            // (regularizedvi centres the prior instead; the same start).
            let overall_log_library = s.iter().sum::<f64>() / k.iter().sum::<f64>().max(1.0);
            if let Some(e) = net.library_encoder.as_mut() {
                e.set_mean_bias(overall_log_library);
            }
            let vars: Vec<f32> = (0..n)
                .map(|b| {
                    let mean = s[b] / k[b].max(1.0);
                    ((ss[b] / k[b].max(1.0) - mean * mean).max(1e-4) * self.cfg.library_prior_scale) as f32
                })
                .collect();
            tch::no_grad(|| {
                net.library_means.copy_(&Tensor::from_slice(&means).to_device(dev));
                net.library_vars.copy_(&Tensor::from_slice(&vars).to_device(dev));
            });
        }
        Ok(())
    }

    /// Per modality q(z_m | x_m) (mean, variance) and, with a learned
    /// library, q(ℓ_m | x_m).
    #[allow(clippy::type_complexity)]
    pub fn encode_modalities(
        &self,
        inp: &MmInputs,
        pass: Pass,
    ) -> (Vec<(Tensor, Tensor)>, Vec<Option<(Tensor, Tensor)>>) {
        self.encode_recording(inp, pass, &mut Vec::new())
    }

    /// As `encode_modalities`; the first layers' weight gradients that
    /// autograd cannot take go to `deferred`.
    #[allow(clippy::type_complexity)]
    fn encode_recording(
        &self,
        inp: &MmInputs,
        pass: Pass,
        deferred: &mut Vec<Deferred>,
    ) -> (Vec<(Tensor, Tensor)>, Vec<Option<(Tensor, Tensor)>>) {
        let cov = inp.encoder_cov.as_ref();
        let mut qz = Vec::with_capacity(self.nets.len());
        let mut ql = Vec::with_capacity(self.nets.len());
        for (net, x) in self.nets.iter().zip(&inp.encoder_input) {
            let x = match x {
                EncoderInput::Dense(t) => Input::Dense(t, cov),
                EncoderInput::Sparse(s) => Input::Sparse(s, cov),
            };
            qz.push(net.encoder.forward_input(x, pass, deferred));
            ql.push(net.library_encoder.as_ref().map(|e| e.forward_input(x, pass, deferred)));
        }
        (qz, ql)
    }

    /// The joint posterior from the modalities' ones.
    pub fn combine(&self, qz: &[(Tensor, Tensor)]) -> (Tensor, Tensor) {
        match self.cfg.combine {
            Combine::Concatenate => (
                Tensor::cat(&qz.iter().map(|q| &q.0).collect::<Vec<_>>(), 1),
                Tensor::cat(&qz.iter().map(|q| &q.1).collect::<Vec<_>>(), 1),
            ),
            Combine::Mean => {
                let total: f64 = self.cfg.modalities.iter().map(|m| m.weight).sum();
                let mut mean = qz[0].0.zeros_like();
                let mut var = qz[0].1.zeros_like();
                for (q, m) in qz.iter().zip(&self.cfg.modalities) {
                    let w = m.weight / total;
                    mean += &q.0 * w;
                    var += &q.1 * w;
                }
                (mean, var)
            }
        }
    }

    /// log θ of modality `m` per dispersion level and feature: a draw from
    /// its LogNormal when `sample`, the log of its mean exp(μ + σ²/2)
    /// otherwise. One draw per level and feature serves the whole minibatch
    /// (regularizedvi draws per cell; both are unbiased, this one costs
    /// levels × features rather than cells × features).
    fn log_theta_table(&self, m: usize, sample: bool) -> Tensor {
        let net = &self.nets[m];
        let sigma = net.theta_log_sigma.exp();
        if sample {
            &net.theta_mu + &sigma * net.theta_mu.randn_like()
        } else {
            &net.theta_mu + sigma.square() * 0.5
        }
    }

    /// The ambient background s = exp(β) per ambient level and feature.
    fn ambient_table(&self, m: usize) -> Option<Tensor> {
        self.nets[m].ambient.as_ref().map(|beta| beta.exp())
    }

    /// The feature scaling y = softplus(γ) / 0.7 per scaling level and feature.
    fn scaling_table(&self, m: usize) -> Option<Tensor> {
        self.nets[m].scaling.as_ref().map(|gamma| gamma.softplus() / SCALING_DIVISOR)
    }

    /// (softplus(f) + s) · y from the decoder's last hidden layer `h`; s left
    /// out unless `ambient`.
    fn mean_from_hidden(&self, m: usize, h: &Tensor, inp: &MmInputs, ambient: bool) -> Tensor {
        let mut out = self.nets[m].head.forward(h).softplus();
        if let (Some(s), true) = (self.ambient_table(m), ambient) {
            out += per_level(&s, &inp.ambient);
        }
        if let Some(y) = self.scaling_table(m) {
            out *= per_level(&y, &inp.scaling);
        }
        out
    }

    /// (softplus(f_m(z)) + s) · y for latent `z` (evaluation mode): the
    /// decoded mean per unit library, the map attribution differentiates.
    pub fn normalized(&self, m: usize, z: &Tensor, inp: &MmInputs) -> Tensor {
        let h = self.nets[m].decoder.forward(z, inp.decoder_cov.as_ref(), Pass::Eval);
        self.mean_from_hidden(m, &h, inp, true)
    }

    /// softplus(f_m(z)) · y: the decoded mean without the ambient background.
    pub fn expressed(&self, m: usize, z: &Tensor, inp: &MmInputs) -> Tensor {
        let h = self.nets[m].decoder.forward(z, inp.decoder_cov.as_ref(), Pass::Eval);
        self.mean_from_hidden(m, &h, inp, false)
    }

    /// Sum of the global terms of modality `m`: −log p(s) (if asked),
    /// −log p(y), the containment penalty of θ at a fresh draw with its
    /// hyperprior, and the decoder ridge. As in regularizedvi, the priors of s
    /// and y are densities of s and y themselves, without Jacobians.
    pub fn global_terms(&self, m: usize) -> Tensor {
        self.global_terms_with(m, false)
    }

    /// `global_terms`; with `head_ridge_elsewhere`, the output layer's
    /// ridge enters as a value only, its gradient being added by the fused
    /// likelihood (`SoftplusDecoded::weight_ridge`).
    fn global_terms_with(&self, m: usize, head_ridge_elsewhere: bool) -> Tensor {
        let net = &self.nets[m];
        let mut total = Tensor::zeros([], (Kind::Float, self.device()));
        if let (Some(beta), true) = (&net.ambient, self.cfg.ambient_prior) {
            total -= gamma_log_prob(&beta.exp(), AMBIENT_PRIOR.0, AMBIENT_PRIOR.1).sum(Kind::Float);
        }
        if let Some(gamma) = &net.scaling {
            let y = gamma.softplus() / SCALING_DIVISOR;
            total -= gamma_log_prob(&y, SCALING_PRIOR.0, SCALING_PRIOR.1).sum(Kind::Float);
        }
        // −H[Normal(μ, σ)] on log θ, and −log Exp(u; λ) = −(log λ − λ u) at u = θ^(−1/2).
        let entropy =
            (&net.theta_log_sigma + 0.5 * (2.0 * std::f64::consts::PI * std::f64::consts::E).ln()).sum(Kind::Float);
        let log_theta = &net.theta_mu + net.theta_log_sigma.exp() * net.theta_mu.randn_like();
        let u = (-log_theta * 0.5).exp();
        let lambda = net.lambda_raw.softplus();
        let log_p = (lambda.log() - &lambda * u).sum(Kind::Float);
        let log_hyper = gamma_log_prob(&lambda, DISPERSION_RATE_PRIOR.0, DISPERSION_RATE_PRIOR.1).sum(Kind::Float);
        total = total - entropy - log_p - log_hyper;
        if self.cfg.decoder_l2 > 0.0 {
            let head = if head_ridge_elsewhere {
                // Σ W² as a dot product, outside the graph.
                let w = net.head.ws.detach().reshape([-1]);
                w.dot(&w)
            } else {
                net.head.ws.square().sum(Kind::Float)
            };
            let ridge = net.decoder.weights().into_iter().fold(head, |a, w| a + w.square().sum(Kind::Float));
            total += ridge * self.cfg.decoder_l2;
        }
        total
    }

    /// Negative ELBO terms per cell: reconstruction of every modality, KL of
    /// z (warmed up), KL of the libraries plus the per-cell share
    /// (÷ `n_obs`) of the global terms (not warmed up).
    pub fn loss_terms(&self, inp: &MmInputs, train: bool) -> LossTerms {
        let pass = Pass::from(train);
        let mut deferred = Vec::new();
        let (qz, ql) = self.encode_recording(inp, pass, &mut deferred);
        let (qm, qv) = self.combine(&qz);
        let z = &qm + qv.sqrt() * crate::dist::randn_rows(&qm);
        let n = qm.size()[0];
        let dev = self.device();
        let mut reconstruction = Tensor::zeros([n], (Kind::Float, dev));
        let mut kl_fixed = Tensor::zeros([n], (Kind::Float, dev));
        // Per modality: whether the fused likelihood took the output layer's ridge.
        let mut head_ridge_fused = Vec::with_capacity(self.nets.len());
        for (m, (net, ql)) in self.nets.iter().zip(&ql).enumerate() {
            let log_library = match ql {
                Some((lm, lv)) => {
                    let pm = net.library_means.index_select(0, &inp.library).unsqueeze(1);
                    let pv = net.library_vars.index_select(0, &inp.library).unsqueeze(1);
                    kl_fixed += kl_normal(lm, lv, &pm, &pv).sum_dim_intlist(-1, false, Kind::Float);
                    if train {
                        lm + lv.sqrt() * crate::dist::randn_rows(lm)
                    } else {
                        lm.shallow_clone()
                    }
                }
                None => inp.log_library[m].shallow_clone(),
            };
            // The fused CPU kernel from the decoder's last hidden layer; the
            // tensor path where it does not apply.
            let h = net.decoder.forward(&z, inp.decoder_cov.as_ref(), pass);
            let log_theta = self.log_theta_table(m, pass == Pass::Train);
            let (ambient, scaling) = (self.ambient_table(m), self.scaling_table(m));
            fn level<'a>(table: &'a Option<Tensor>, codes: &'a Tensor) -> Option<PerLevel<'a>> {
                table.as_ref().map(|table| PerLevel { table, codes })
            }
            let decoded = SoftplusDecoded {
                hidden: &h,
                weight: &net.head.ws,
                bias: net.head.bs.as_ref().expect("head has a bias"),
                log_library: &log_library,
                log_theta: PerLevel { table: &log_theta, codes: &inp.dispersion },
                ambient: level(&ambient, &inp.ambient),
                scaling: level(&scaling, &inp.scaling),
                weight_ridge: self.cfg.decoder_l2 / self.n_obs,
            };
            let fused = fused_softplus_rows(&inp.nonzero[m], &decoded);
            head_ridge_fused.push(fused.is_some());
            let kernel = fused.unwrap_or_else(|| {
                let rate = log_library.exp() * self.mean_from_hidden(m, &h, inp, true);
                nb_log_kernel_rows(&inp.nonzero[m], &rate, &per_level(&log_theta, &inp.dispersion).exp(), 1e-8)
            });
            reconstruction -= kernel - &inp.log_factorial[m];
        }
        let kl_z = kl_normal(&qm, &qv, &qm.zeros_like(), &qv.ones_like()).sum_dim_intlist(-1, false, Kind::Float);
        let global = head_ridge_fused
            .iter()
            .enumerate()
            .fold(Tensor::zeros([], (Kind::Float, dev)), |a, (m, &fused)| a + self.global_terms_with(m, fused));
        LossTerms { reconstruction, kl_warmup: kl_z, kl_fixed: kl_fixed + global / self.n_obs, deferred, penalty: None }
    }
}

mod fitted;
pub mod infer;
pub use fitted::{Key, MultimodalMeta, MultimodalModel};

#[cfg(test)]
mod tests;

/// A multimodal model with its training data: what the training loop drives.
pub struct MultimodalTask<'a> {
    pub model: &'a Multimodal,
    pub data: &'a MultimodalData<'a>,
}

impl Trainable for MultimodalTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.model.vs
    }

    fn n_cells(&self) -> usize {
        self.data.n_cells()
    }

    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        self.model.loss_terms(&self.data.inputs_from(rows, self.model.device(), train), train)
    }

    fn split(&self, validation_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        match self.data.disks().first() {
            Some(d) => d.split(validation_fraction, seed),
            None => crate::data::train_validation_split(self.n_cells(), validation_fraction, seed),
        }
    }

    /// On disk, every modality streams the same order (same blocks, same
    /// windows, same seed), each from its own reader thread.
    fn epoch_order(&self, rows: &mut Vec<usize>, seed: u64) {
        let disks = self.data.disks();
        if disks.is_empty() {
            rows.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            return;
        }
        let ranks = crate::dist::current().map(|g| (g.rank(), g.world()));
        let orders: Vec<Vec<usize>> = disks.iter().map(|d| d.epoch_order(rows, seed, ranks)).collect();
        debug_assert!(orders.windows(2).all(|w| w[0] == w[1]), "modalities stream in step");
        *rows = orders.into_iter().next().unwrap_or_default();
    }

    fn end_epoch(&self) {
        self.data.disks().iter().for_each(|d| d.end_stream());
    }
}
