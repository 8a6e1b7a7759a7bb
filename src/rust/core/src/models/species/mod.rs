//! Cross-species alignment (scSpecies; Schaar et al. 2024). A context
//! species (well annotated) and a target species share one latent space:
//!
//! - **Context model**: an scVI-type model, outer encoder → inner encoder →
//!   z, learned library, batch-conditioned count decoder.
//! - **Target model**: its own outer encoder (on all of its genes), library
//!   encoder and decoder, but the context's inner encoder, frozen; its
//!   outer encoder's output ("inter") is pulled, with weight η, toward the
//!   "inter" of the context cell whose latent explains the target cell's
//!   counts best among its `k_neigh` data-level neighbours on homologous
//!   genes (`align`). Only the `top_percent` % of target cells whose
//!   neighbours agree most on a label are pulled.
//! - **Analyses** (`analysis`): likelihood-based label transfer, cell-type
//!   similarity, homologous-gene fold changes.
//!
//! Differences from scSpecies 0.1.4, each deliberate: the decoder has one
//! softmax over all genes (scSpecies splits
//! homologous and other genes; fold changes renormalise over the homologous
//! genes either way); a target cell without a pulled cell in its minibatch
//! adds no alignment term (scSpecies then pulls one random cell).

pub mod align;
pub mod analysis;
pub mod fitted;
#[cfg(test)]
mod tests;

use super::count_decoder::{CountDecoder, CountDecoderSpec, Dispersion};
use super::vae::{Inputs, VaeData};
use crate::data::{Categorical, CountMatrix, Covariates};
use crate::device::seed_torch;
use crate::error::{check_param, invalid, Result};
use crate::io;
use crate::likelihood::Likelihood;
use crate::nn::{kl_normal, Deferred, FcLayers, FcSpec, GaussianEncoder, Input, Norm, Pass};
use crate::train::{train, EpochRecord, LossTerms, TrainConfig, Trainable, TrainingRecord};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::BTreeMap;
use tch::nn;
use tch::{Device, Kind, Tensor};

/// Where the target is pulled toward its context match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Alignment {
    /// The outer encoder's output, read by the shared inner encoder.
    Inter,
    /// z itself; the target then has an inner encoder of its own.
    Latent,
}

impl Alignment {
    pub fn parse(s: &str) -> Option<Alignment> {
        match s {
            "inter" => Some(Alignment::Inter),
            "latent" => Some(Alignment::Latent),
            _ => None,
        }
    }
}

/// The data-dependent sizes of one species' network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SideShape {
    pub n_genes: usize,
    pub n_batch: usize,
}

/// Architecture and alignment settings; defaults are scSpecies 0.1.4's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeciesConfig {
    pub n_latent: usize,
    /// Hidden widths of the outer encoders; the last is the "inter" width.
    pub outer: Vec<usize>,
    pub inner: Vec<usize>,
    pub library: Vec<usize>,
    pub decoder: Vec<usize>,
    pub dropout: f64,
    pub likelihood: Likelihood,
    pub dispersion: Dispersion,
    pub alignment: Alignment,
    /// The encoders read log(1 + counts) (`true`) or the raw counts (as
    /// scSpecies does, the default: on 2,000 + 2,000 simulated cells at 40
    /// epochs, label transfer reached balanced accuracy 0.90 from raw
    /// counts and 0.68 from log counts).
    pub log_input: bool,
    /// Data-level neighbours scored per target cell.
    pub k_neigh: usize,
    /// Share (percent) of target cells pulled, by neighbour-label agreement.
    pub top_percent: f64,
    /// η rises linearly from `eta_start` to `eta_max` over `eta_epochs`.
    pub eta_start: f64,
    pub eta_max: f64,
    pub eta_epochs: usize,
    /// Where the CPU has native bf16 (see [`crate::nn::fast_bf16`]), the
    /// data-level neighbour search and the alignment step's scoring of
    /// candidates run their products in bf16 (training's own products
    /// follow the phases' [`TrainConfig::bf16`]).
    pub bf16_scoring: bool,
    pub context: SideShape,
    pub target: SideShape,
}

impl Default for SpeciesConfig {
    fn default() -> Self {
        SpeciesConfig {
            n_latent: 10,
            outer: vec![300],
            inner: vec![200],
            library: vec![200],
            decoder: vec![200, 300],
            dropout: 0.1,
            likelihood: Likelihood::Zinb,
            dispersion: Dispersion::GeneBatch,
            alignment: Alignment::Inter,
            log_input: false,
            k_neigh: 25,
            top_percent: 20.0,
            eta_start: 10.0,
            eta_max: 25.0,
            eta_epochs: 10,
            bf16_scoring: true,
            context: SideShape::default(),
            target: SideShape::default(),
        }
    }
}

impl SpeciesConfig {
    pub fn check(&self) -> Result<()> {
        check_param(self.n_latent >= 1, "n_latent", "must be at least 1")?;
        for (name, w) in [("outer", &self.outer), ("inner", &self.inner), ("library", &self.library)] {
            check_param(!w.is_empty() && w.iter().all(|&x| x >= 1), name, "must be one or more positive widths")?;
        }
        check_param(
            self.decoder.iter().all(|&x| x >= 1) && !self.decoder.is_empty(),
            "decoder",
            "must be one or more positive widths",
        )?;
        check_param((0.0..1.0).contains(&self.dropout), "dropout", "must be in [0, 1)")?;
        check_param(self.k_neigh >= 1, "k_neigh", "must be at least 1")?;
        check_param(self.top_percent > 0.0 && self.top_percent <= 100.0, "top_percent", "must be in (0, 100]")?;
        check_param(self.eta_start >= 0.0 && self.eta_max >= 0.0, "eta", "must be non-negative")
    }

    /// The training defaults of scSpecies: Adam at PyTorch's defaults, 40
    /// epochs, batches of 128, KL weight 0.1 → 1 over 10 epochs, no early
    /// stopping, every cell trained on.
    pub fn default_training() -> TrainConfig {
        TrainConfig {
            max_epochs: 40,
            batch_size: 128,
            lr: 1e-3,
            weight_decay: 0.0,
            adam_eps: 1e-8,
            kl_warmup: 0.0,
            kl_warmup_epochs: 10,
            kl_start: 0.1,
            early_stopping: false,
            validation_fraction: 0.0,
            bf16: true,
            ..Default::default()
        }
    }
}

/// One species' network: outer encoder, library encoder, count decoder
/// and, for the context (or a target aligned on z), the inner encoder.
pub struct Side {
    pub(crate) outer: FcLayers,
    pub(crate) inner: Option<GaussianEncoder>,
    pub(crate) library: GaussianEncoder,
    pub(crate) decoder: CountDecoder,
    library_log_means: Tensor,
    library_log_vars: Tensor,
    log_input: bool,
    /// Training steps read the encoders' input as bf16 (set with the
    /// mixed-precision products, see [`Side::set_bf16_training`]).
    bf16_input: Cell<bool>,
    pub shape: SideShape,
}

/// A minibatch through one side's encoders.
pub struct Encoded {
    pub inter: Tensor,
    pub qz: (Tensor, Tensor),
    pub ql: (Tensor, Tensor),
}

impl Side {
    fn new(root: &nn::Path, cfg: &SpeciesConfig, shape: SideShape, own_inner: bool) -> Side {
        let stack = |n_in: usize, n_cov: usize| FcSpec {
            n_in,
            n_hidden: 0,
            n_layers: 0,
            n_cov,
            dropout: cfg.dropout,
            norm: Norm::Layer,
            inject_all: false,
            sparse_input: false,
        };
        let inter = *cfg.outer.last().expect("checked");
        let outer = FcLayers::with_widths(&(root / "outer"), stack(shape.n_genes, shape.n_batch), &cfg.outer);
        let inner = own_inner
            .then(|| GaussianEncoder::with_widths(&(root / "inner"), stack(inter, 0), &cfg.inner, cfg.n_latent));
        let library =
            GaussianEncoder::with_widths(&(root / "library"), stack(shape.n_genes, shape.n_batch), &cfg.library, 1);
        let decoder = CountDecoder::new(
            root,
            CountDecoderSpec {
                stack: stack(cfg.n_latent, shape.n_batch),
                widths: &cfg.decoder,
                n_genes: shape.n_genes,
                likelihood: cfg.likelihood,
                dispersion: cfg.dispersion,
                n_batch: shape.n_batch,
            },
        );
        Side {
            outer,
            inner,
            library,
            decoder,
            library_log_means: root.zeros_no_train("library_log_means", &[shape.n_batch as i64]),
            library_log_vars: root.ones_no_train("library_log_vars", &[shape.n_batch as i64]),
            log_input: cfg.log_input,
            bf16_input: Cell::new(false),
            shape,
        }
    }

    /// The per-batch log-normal prior of the library from the data (as scVI
    /// and scSpecies), and the library encoder's mean started at its mean.
    fn set_library_prior(&mut self, data: &VaeData) {
        let (means, vars) = data.library_prior(self.shape.n_batch);
        let device = self.library_log_means.device();
        tch::no_grad(|| {
            self.library_log_means.copy_(&Tensor::from_slice(&means).to_device(device));
            self.library_log_vars.copy_(&Tensor::from_slice(&vars).to_device(device));
        });
        let all = data.log_library.iter().map(|&l| l as f64).sum::<f64>() / data.log_library.len().max(1) as f64;
        self.library.set_mean_bias(all);
    }

    /// Mixed-precision training of the gene-wide products when asked and
    /// the device has native bf16 (see [`TrainConfig::bf16`]); returns
    /// whether it is on.
    fn set_bf16_training(&self, asked: bool) -> bool {
        let on = crate::nn::bf16_on(asked, self.library_log_means.device());
        self.outer.set_bf16_training(on);
        self.library.set_bf16_training(on);
        self.decoder.set_bf16_training(on);
        self.bf16_input.set(on);
        on
    }

    /// A minibatch of `data` as this side's loss reads it: in a training
    /// pass with mixed precision on, with the encoders' input as bf16 (see
    /// [`VaeData::inputs_bf16`]).
    fn inputs(&self, data: &VaeData, rows: &[usize], pass: Pass) -> (Inputs, Option<Tensor>) {
        if pass == Pass::Train && self.bf16_input.get() {
            let (inp, x) = data.inputs_bf16(rows, self.log_input, false);
            (inp, Some(x))
        } else {
            (data.inputs(rows, None, self.library_log_means.device()), None)
        }
    }

    /// Encoders on a minibatch; `inner`: the inner encoder to use.
    pub fn encode(&self, inner: &GaussianEncoder, inp: &Inputs, pass: Pass) -> Encoded {
        self.encode_with(inner, inp, None, pass, &mut Vec::new())
    }

    /// `encode`, reading `first` (the bf16 input of [`Side::inputs`]) when
    /// given; the gradients of products that read it are left on `deferred`.
    fn encode_with(
        &self,
        inner: &GaussianEncoder,
        inp: &Inputs,
        first: Option<&Tensor>,
        pass: Pass,
        deferred: &mut Vec<Deferred>,
    ) -> Encoded {
        let raw;
        let x = match first {
            Some(x) => Input::DenseBf16(x, Some(&inp.design)),
            None if self.log_input => Input::Dense(&inp.log1p_x, Some(&inp.design)),
            None => {
                raw = inp.log1p_x.expm1();
                Input::Dense(&raw, Some(&inp.design))
            }
        };
        let inter = self.outer.forward_input(x, pass, deferred);
        let qz = inner.forward(&inter, None, pass);
        let ql = self.library.forward_input(x, pass, deferred);
        Encoded { inter, qz, ql }
    }

    /// Negative ELBO terms: reconstruction, and the KL of z and of the
    /// library (both warmed up, as scSpecies); with the encodings and the
    /// draws of z and log l.
    fn loss(
        &self,
        inner: &GaussianEncoder,
        inp: &Inputs,
        first: Option<&Tensor>,
        pass: Pass,
    ) -> (LossTerms, Encoded, Tensor, Tensor) {
        let mut deferred = Vec::new();
        let enc = self.encode_with(inner, inp, first, pass, &mut deferred);
        let (qm, qv) = &enc.qz;
        let (lm, lv) = &enc.ql;
        let z = qm + qv.sqrt() * crate::dist::randn_rows(qm);
        let l = lm + lv.sqrt() * crate::dist::randn_rows(lm);
        let pm = self.library_log_means.index_select(0, &inp.batch).unsqueeze(1);
        let pv = self.library_log_vars.index_select(0, &inp.batch).unsqueeze(1);
        let kl_l = kl_normal(lm, lv, &pm, &pv).sum_dim_intlist(-1, false, Kind::Float);
        let kl_z = kl_normal(qm, qv, &qm.zeros_like(), &qv.ones_like()).sum_dim_intlist(-1, false, Kind::Float);
        let heads = self.decoder.heads(&z, &inp.design, &inp.batch, pass);
        let reconstruction = -self.decoder.log_likelihood_heads(&inp.nonzero, &inp.log_factorial, heads, &l);
        let terms = LossTerms {
            reconstruction,
            kl_warmup: kl_z + kl_l,
            kl_fixed: Tensor::zeros([1], (Kind::Float, qm.device())),
            deferred,
            penalty: None,
        };
        (terms, enc, z, l)
    }
}

/// The context phase: the context side and its own inner encoder.
struct ContextTask<'a> {
    vs: &'a nn::VarStore,
    side: &'a Side,
    data: &'a VaeData<'a>,
}

impl Trainable for ContextTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        self.vs
    }
    fn n_cells(&self) -> usize {
        self.data.n_cells()
    }
    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        let pass: Pass = train.into();
        let (inp, first) = self.side.inputs(self.data, rows, pass);
        let inner = self.side.inner.as_ref().expect("the context has an inner encoder");
        self.side.loss(inner, &inp, first.as_ref(), pass).0
    }
}

/// The target phase: the target side, the frozen context inner encoder
/// (or the target's own), and the alignment term.
struct TargetTask<'a> {
    vs: &'a nn::VarStore,
    side: &'a Side,
    inner: &'a GaussianEncoder,
    data: &'a VaeData<'a>,
    align: &'a align::AlignmentTargets,
    cfg: &'a SpeciesConfig,
    eta: Cell<f64>,
}

impl Trainable for TargetTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        self.vs
    }
    fn n_cells(&self) -> usize {
        self.data.n_cells()
    }
    fn start_epoch(&self, epoch: usize) {
        let c = self.cfg;
        let rise = if c.eta_epochs == 0 { 1.0 } else { (epoch as f64 / c.eta_epochs as f64).min(1.0) };
        self.eta.set(c.eta_start + (c.eta_max - c.eta_start) * rise);
    }
    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        let pass: Pass = train.into();
        let (inp, first) = self.side.inputs(self.data, rows, pass);
        let (mut terms, enc, z, l) = self.side.loss(self.inner, &inp, first.as_ref(), pass);
        if train {
            terms.penalty = self
                .align
                .penalty(self.side, self.data, rows, &enc, &z, &l, self.cfg.alignment, pass)
                .map(|p| p * self.eta.get());
        }
        terms
    }
}

/// Everything a trained cross-species model needs to be used again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpeciesMeta {
    pub config: SpeciesConfig,
    pub context_genes: Vec<String>,
    pub target_genes: Vec<String>,
    /// One-to-one homologous pairs: (context gene, target gene), 0-based.
    pub homologs: Vec<(u32, u32)>,
    pub context_batch_levels: Vec<String>,
    pub target_batch_levels: Vec<String>,
    /// Where each species' batch was found (a cell-metadata column), "" if not.
    #[serde(default)]
    pub context_batch_name: String,
    #[serde(default)]
    pub target_batch_name: String,
    pub label_levels: Vec<String>,
    /// The context cells' labels and batches (codes), kept for the analyses.
    pub context_labels: Vec<u32>,
    pub context_batches: Vec<u32>,
    pub context_cells: Vec<String>,
    /// Target cells pulled toward a context match during training.
    pub n_aligned: usize,
    pub context_training: TrainingRecord,
    pub target_training: TrainingRecord,
}

/// A trained cross-species model.
pub struct SpeciesModel {
    pub meta: SpeciesMeta,
    pub(crate) context_vs: nn::VarStore,
    pub(crate) target_vs: nn::VarStore,
    pub(crate) context: Side,
    pub(crate) target: Side,
    /// Posterior means of z of the context cells [cells, n_latent], and
    /// their observed log library sizes [cells] (stored with the weights).
    pub(crate) context_latent: Tensor,
    pub(crate) context_log_library: Tensor,
}

impl std::fmt::Debug for SpeciesModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpeciesModel").field("config", &self.meta.config).finish_non_exhaustive()
    }
}

/// One species' training data as given to `fit`.
pub struct SpeciesData<'a> {
    pub counts: &'a CountMatrix,
    pub batch: Categorical,
}

impl SpeciesModel {
    fn build(meta_cfg: &SpeciesConfig, n_context: usize, device: Device) -> Result<SpeciesModel> {
        meta_cfg.check()?;
        let context_vs = nn::VarStore::new(device);
        let target_vs = nn::VarStore::new(device);
        let croot = context_vs.root() / "context";
        let context = Side::new(&croot, meta_cfg, meta_cfg.context, true);
        let target = Side::new(
            &(target_vs.root() / "target"),
            meta_cfg,
            meta_cfg.target,
            meta_cfg.alignment == Alignment::Latent,
        );
        let context_latent = croot.zeros_no_train("cells_latent", &[n_context as i64, meta_cfg.n_latent as i64]);
        let context_log_library = croot.zeros_no_train("cells_log_library", &[n_context as i64]);
        Ok(SpeciesModel {
            meta: SpeciesMeta {
                config: meta_cfg.clone(),
                context_genes: vec![],
                target_genes: vec![],
                homologs: vec![],
                context_batch_levels: vec![],
                target_batch_levels: vec![],
                context_batch_name: String::new(),
                target_batch_name: String::new(),
                label_levels: vec![],
                context_labels: vec![],
                context_batches: vec![],
                context_cells: vec![],
                n_aligned: 0,
                context_training: TrainingRecord::new(TrainConfig::default(), Default::default(), 0),
                target_training: TrainingRecord::new(TrainConfig::default(), Default::default(), 0),
            },
            context_vs,
            target_vs,
            context,
            target,
            context_latent,
            context_log_library,
        })
    }

    /// The inner encoder target cells go through.
    pub(crate) fn target_inner(&self) -> &GaussianEncoder {
        self.target.inner.as_ref().or(self.context.inner.as_ref()).expect("the context has an inner encoder")
    }

    pub fn device(&self) -> Device {
        self.context_vs.device()
    }

    /// Trains the context model, then the target model aligned to it.
    /// `homologs`: (target gene, context gene) name pairs, one-to-one.
    /// `on_epoch(phase, record)`: phase 0 context, 1 target.
    #[allow(clippy::too_many_arguments)]
    pub fn fit(
        context: SpeciesData,
        labels: &Categorical,
        target: SpeciesData,
        homologs: &[(String, String)],
        mut config: SpeciesConfig,
        mut train_context: TrainConfig,
        mut train_target: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(usize, &EpochRecord),
    ) -> Result<SpeciesModel> {
        let (nc, nt) = (context.counts.n_cells(), target.counts.n_cells());
        if context.batch.codes.len() != nc || labels.codes.len() != nc || target.batch.codes.len() != nt {
            return invalid!("batch or label values do not match the number of cells");
        }
        if labels.n_levels() < 2 || labels.level_sizes().iter().filter(|&&s| s > 0).count() < 2 {
            return invalid!(
                "the context has a single cell type ('{}'): labels cannot be transferred; give a context with at least two types",
                labels.levels.first().map_or("", |s| s.as_str())
            );
        }
        let pairs = align::homolog_pairs(homologs, &context.counts.genes, &target.counts.genes)?;
        config.context = SideShape { n_genes: context.counts.n_genes(), n_batch: context.batch.n_levels() };
        config.target = SideShape { n_genes: target.counts.n_genes(), n_batch: target.batch.n_levels() };
        check_param(nc > config.k_neigh, "k_neigh", "must be smaller than the number of context cells")?;
        train_context.check()?;
        train_target.check()?;
        seed_torch(train_context.seed);
        let mut model = SpeciesModel::build(&config, nc, device)?;
        train_context.bf16 = model.context.set_bf16_training(train_context.bf16);
        train_target.bf16 = model.target.set_bf16_training(train_target.bf16);

        // Phase 1: the context model.
        let c_cov = Covariates::new(context.batch.clone(), vec![], vec![])?;
        let c_data = VaeData::new(&context.counts.csr, &c_cov);
        model.context.set_library_prior(&c_data);
        let c_hist = train(
            &ContextTask { vs: &model.context_vs, side: &model.context, data: &c_data },
            &train_context,
            interrupted,
            &|r| on_epoch(0, r),
        )?;
        let stopped = c_hist.interrupted || c_hist.diverged_at.is_some();
        let context_record = TrainingRecord::new(train_context, c_hist, nc);

        // The context cells' representations, then the alignment targets.
        let reps = align::context_representations(&model, &c_data);
        tch::no_grad(|| {
            model.context_latent.copy_(&reps.mean);
            let ll = Tensor::from_slice(&c_data.log_library).to_device(device);
            model.context_log_library.copy_(&ll);
        });
        let t_cov = Covariates::new(target.batch.clone(), vec![], vec![])?;
        let t_data = VaeData::new(&target.counts.csr, &t_cov);
        let bf16 = crate::nn::bf16_on(config.bf16_scoring, device);
        let candidates =
            align::data_neighbours(&context.counts.csr, &target.counts.csr, &pairs, config.k_neigh, device, bf16);
        let aligned =
            align::agreement(&candidates, &labels.codes, labels.n_levels(), config.k_neigh, config.top_percent);
        let mut targets = align::AlignmentTargets::new(candidates, aligned, reps, config.k_neigh);
        targets.bf16 = bf16;

        // Phase 2: the target model, the context frozen.
        model.context_vs.freeze();
        seed_torch(train_target.seed.wrapping_add(1));
        model.target.set_library_prior(&t_data);
        let t_hist = if stopped {
            // An interrupted or diverged context is not worth aligning to.
            Default::default()
        } else {
            let task = TargetTask {
                vs: &model.target_vs,
                side: &model.target,
                inner: model.target_inner(),
                data: &t_data,
                align: &targets,
                cfg: &config,
                eta: Cell::new(config.eta_start),
            };
            train(&task, &train_target, interrupted, &|r| on_epoch(1, r))?
        };
        model.meta = SpeciesMeta {
            config,
            context_genes: context.counts.genes.clone(),
            target_genes: target.counts.genes.clone(),
            homologs: pairs,
            context_batch_levels: context.batch.levels.clone(),
            target_batch_levels: target.batch.levels.clone(),
            context_batch_name: context.batch.name.clone(),
            target_batch_name: target.batch.name.clone(),
            label_levels: labels.levels.clone(),
            context_labels: labels.codes.clone(),
            context_batches: context.batch.codes.clone(),
            context_cells: context.counts.cells.clone(),
            n_aligned: targets.n_aligned(),
            context_training: context_record,
            target_training: TrainingRecord::new(train_target, t_hist, nt),
        };
        Ok(model)
    }

    /// The model as a model file's bytes: both species' weights in one file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut vars: BTreeMap<String, Tensor> = BTreeMap::new();
        for vs in [&self.context_vs, &self.target_vs] {
            vars.extend(vs.variables());
        }
        io::tensors_to_bytes(vars, "species", &self.meta)
    }

    /// Reads a model written by `to_bytes` onto `device`.
    pub fn from_bytes(bytes: &[u8], device: Device) -> Result<SpeciesModel> {
        let (meta, tensors): (SpeciesMeta, _) = io::model_from_bytes(bytes, "species", "a cross-species model")?;
        let c = &meta.config;
        io::check_meta("context genes", meta.context_genes.len(), c.context.n_genes)?;
        io::check_meta("target genes", meta.target_genes.len(), c.target.n_genes)?;
        io::check_meta("context batches", meta.context_batch_levels.len(), c.context.n_batch)?;
        io::check_meta("target batches", meta.target_batch_levels.len(), c.target.n_batch)?;
        io::check_meta("context cells", meta.context_labels.len(), meta.context_cells.len())?;
        let mut model = SpeciesModel::build(c, meta.context_cells.len(), device)?;
        let part = |prefix: &str| -> BTreeMap<String, Tensor> {
            tensors.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.shallow_clone())).collect()
        };
        io::load_into(&model.context_vs, &part("context."))?;
        io::load_into(&model.target_vs, &part("target."))?;
        model.meta = meta;
        Ok(model)
    }
}
