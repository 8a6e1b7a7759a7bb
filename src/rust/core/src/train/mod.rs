//! The one training loop of every model: Adam, KL warm-up, validation,
//! early stopping with best-weight restore, history, interrupts.

use crate::data::train_validation_split;
use crate::error::{check_param, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;
use tch::{nn, nn::OptimizerConfig, Kind, Tensor};

use crate::kernels::adam;

mod parallel;
pub use parallel::agree;

/// Adam: the fused CPU update where it applies, else libtorch's (same
/// rule). libtorch's optimizer is kept in both cases for `zero_grad`, which
/// drops the gradients (rather than zeroing them) so that a parameter left
/// out of a step's loss is not updated, as in PyTorch; it allocates no state
/// unless stepped.
struct Optimizer {
    torch: nn::Optimizer,
    fused: Option<adam::Adam>,
}

impl Optimizer {
    fn new(vs: &nn::VarStore, cfg: &TrainConfig) -> Result<Optimizer> {
        Ok(Optimizer {
            torch: nn::Adam { wd: cfg.weight_decay, eps: cfg.adam_eps, ..Default::default() }.build(vs, cfg.lr)?,
            fused: adam::Adam::new(vs, cfg.lr, cfg.weight_decay, cfg.adam_eps),
        })
    }

    fn zero_grad(&mut self) {
        self.torch.zero_grad();
    }

    /// One step; `extra` holds (parameter, gradient) pairs computed outside
    /// autograd (added to autograd's gradients), `shadows` (parameter, bf16
    /// copy) pairs whose copies must follow the update.
    fn step(&mut self, extra: &[(Tensor, Tensor)], shadows: &[(Tensor, Tensor)]) {
        match &mut self.fused {
            Some(a) => a.step(extra, shadows),
            None => {
                // libtorch's optimizer reads `.grad`: put the gradient there
                // through a product whose gradient it is.
                for (p, g) in extra {
                    (p * g.detach().to_kind(p.kind())).sum(Kind::Float).backward();
                }
                self.torch.step();
                tch::no_grad(|| {
                    for (p, s) in shadows {
                        s.shallow_clone().copy_(p);
                    }
                });
            }
        }
    }
}

/// A model's negative ELBO per cell, split the way the loop weighs it:
/// `reconstruction + w · kl_warmup + kl_fixed`, where w is the KL weight.
pub struct LossTerms {
    pub reconstruction: Tensor,
    pub kl_warmup: Tensor,
    pub kl_fixed: Tensor,
    /// Weights whose gradients the model computes itself after `backward()`
    /// (sparse first layers, `kernels::sparse`).
    pub deferred: Vec<crate::nn::Deferred>,
    /// A scalar added to the minibatch's training loss but not to its ELBO
    /// (the cross-species alignment term).
    pub penalty: Option<Tensor>,
}

impl LossTerms {
    /// A loss without KL terms (the models trained on a fixed latent space).
    pub fn plain(loss: Tensor) -> LossTerms {
        let zero = loss.zeros_like();
        LossTerms {
            reconstruction: loss,
            kl_warmup: zero.shallow_clone(),
            kl_fixed: zero,
            deferred: vec![],
            penalty: None,
        }
    }
}

/// What the loop needs from a model bound to its data.
pub trait Trainable {
    fn var_store(&self) -> &nn::VarStore;
    fn n_cells(&self) -> usize;
    /// Loss terms of the cells `rows` (dropout and batch statistics on when `train`).
    fn loss(&self, rows: &[usize], train: bool) -> LossTerms;
    /// Called before each training epoch (0-based), for schedules of the
    /// model's own (the cross-species alignment weight).
    fn start_epoch(&self, _epoch: usize) {}
    /// Called after every optimiser step (a mapped model puts its frozen
    /// reference values back here).
    fn after_step(&self) {}
    /// Called after each epoch's training steps, before the validation
    /// loss, with the training rows (a distilled encoder sets its batch
    /// norms' statistics here).
    fn before_validation(&self, _train_rows: &[usize]) {}
    /// The (training, validation) cells, each sorted; by default a seeded
    /// random `validation_fraction` of the cells is held out (data on disk
    /// holds out whole blocks of cells).
    fn split(&self, validation_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        train_validation_split(self.n_cells(), validation_fraction, seed)
    }
    /// Puts the training cells in an epoch's order: by default a seeded
    /// shuffle (data on disk shuffles blocks and windows of them, and
    /// starts reading ahead).
    fn epoch_order(&self, rows: &mut Vec<usize>, seed: u64) {
        rows.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    }
    /// Called after each epoch's training steps (data on disk stops reading ahead).
    fn end_epoch(&self) {}
}

/// Optimisation settings; defaults are scvi-tools 1.4's except the KL
/// warm-up, which spans a fraction of the planned steps instead of 400 epochs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub max_epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub adam_eps: f64,
    /// Fraction of the planned optimiser steps over which the KL weight rises
    /// linearly from 0 to 1 (0: no warm-up).
    pub kl_warmup: f64,
    /// When positive, the KL weight instead rises per epoch from `kl_start`
    /// to 1 over this many epochs, held within an epoch (scSpecies' rule:
    /// 0.1 to 1 over 10 epochs).
    pub kl_warmup_epochs: usize,
    pub kl_start: f64,
    pub early_stopping: bool,
    pub patience: usize,
    pub min_delta: f64,
    pub validation_fraction: f64,
    pub seed: u64,
    /// Mixed precision: where the CPU has native bf16 ([`crate::nn::fast_bf16`]),
    /// the training passes run the products that read or write the genes
    /// (encoders' first layers, the decoder's output heads) in bf16, with
    /// f32 weights, optimiser and likelihood; inference stays in f32. Used
    /// by the VAE (and its query mapping), the distiller and the
    /// cross-species model; the others (the multimodal model, the small
    /// models on latent spaces) train in f32. A fitted model's record says
    /// whether it was used.
    pub bf16: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_epochs: 400,
            batch_size: 128,
            lr: 1e-3,
            weight_decay: 1e-6,
            adam_eps: 0.01,
            kl_warmup: 0.5,
            kl_warmup_epochs: 0,
            kl_start: 0.0,
            early_stopping: true,
            patience: 45,
            min_delta: 0.0,
            validation_fraction: 0.1,
            seed: 0,
            bf16: false,
        }
    }
}

/// scvi-tools' rule: min(round(20000 / n_cells · 400), 400) epochs.
pub fn default_max_epochs(n_cells: usize) -> usize {
    ((20_000.0 / n_cells.max(1) as f64 * 400.0).round() as usize).clamp(1, 400)
}

impl TrainConfig {
    pub fn check(&self) -> Result<()> {
        check_param(self.max_epochs >= 1, "max_epochs", "must be at least 1")?;
        check_param(self.batch_size >= 2, "batch_size", "must be at least 2")?;
        check_param(self.lr > 0.0 && self.lr.is_finite(), "lr", "must be positive")?;
        check_param(self.weight_decay >= 0.0, "weight_decay", "must be non-negative")?;
        check_param((0.0..=1.0).contains(&self.kl_warmup), "kl_warmup", "must be in [0, 1]")?;
        check_param((0.0..=1.0).contains(&self.kl_start), "kl_start", "must be in [0, 1]")?;
        check_param(self.patience >= 1, "patience", "must be at least 1")?;
        check_param((0.0..0.9).contains(&self.validation_fraction), "validation_fraction", "must be in [0, 0.9)")
    }
}

/// One epoch of the history. Losses are means per cell; `*_elbo` are
/// negative ELBOs at KL weight 1 (lower is better).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    // JSON has no NaN: serde_json writes it as null (a validation ELBO
    // without validation cells, a diverged epoch), read back as NaN.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl_weight: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub train_elbo: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub train_reconstruction: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub train_kl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub validation_elbo: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub validation_reconstruction: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub validation_kl: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds: f64,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(<Option<f64> as Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// What training did.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub epochs: Vec<EpochRecord>,
    /// Epoch (1-based) whose weights the model holds.
    pub best_epoch: usize,
    pub stopped_early: bool,
    pub interrupted: bool,
    /// Epoch (1-based) whose loss was not finite: training stopped there and
    /// the model holds the weights of the epoch before.
    pub diverged_at: Option<usize>,
    pub train_cells: Vec<usize>,
    pub validation_cells: Vec<usize>,
}

/// How a model was trained, as its model file keeps it (flattened into the
/// model's metadata, so the file's fields keep their names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub train: TrainConfig,
    pub history: Vec<EpochRecord>,
    /// Epoch (1-based) whose weights the model holds.
    pub best_epoch: usize,
    pub stopped_early: bool,
    pub interrupted: bool,
    /// Epoch whose loss was not finite (training stopped; see `History`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged_at: Option<usize>,
    pub n_cells: usize,
    /// 0-based indices of the held-out cells of the training data.
    pub validation_cells: Vec<usize>,
}

impl TrainingRecord {
    pub fn new(train: TrainConfig, history: History, n_cells: usize) -> TrainingRecord {
        TrainingRecord {
            train,
            history: history.epochs,
            best_epoch: history.best_epoch,
            stopped_early: history.stopped_early,
            interrupted: history.interrupted,
            diverged_at: history.diverged_at,
            n_cells,
            validation_cells: history.validation_cells,
        }
    }
}

/// Mean negative ELBO, reconstruction and KL per cell over `rows`, in
/// evaluation mode without gradients.
pub fn evaluate(task: &dyn Trainable, rows: &[usize], batch_size: usize) -> (f64, f64, f64) {
    if rows.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let (mut rec, mut kl) = (0f64, 0f64);
    tch::no_grad(|| {
        for chunk in rows.chunks(batch_size.max(1)) {
            let t = task.loss(chunk, false);
            rec += t.reconstruction.sum(Kind::Double).double_value(&[]);
            kl += (t.kl_warmup + t.kl_fixed).sum(Kind::Double).double_value(&[]);
        }
    });
    let n = rows.len() as f64;
    ((rec + kl) / n, rec / n, kl / n)
}

fn snapshot(vs: &nn::VarStore) -> HashMap<String, Tensor> {
    tch::no_grad(|| vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect())
}

fn restore(vs: &nn::VarStore, saved: &HashMap<String, Tensor>) {
    crate::nn::new_weights_generation();
    tch::no_grad(|| {
        for (k, mut v) in vs.variables() {
            if let Some(s) = saved.get(&k) {
                v.copy_(s);
            }
        }
    });
}

/// Trains `task` with Adam. The KL weight rises over the first
/// `kl_warmup` fraction of the planned steps. Once it has reached 1, the
/// loop tracks the best validation ELBO (training ELBO without a validation
/// set); with early stopping it stops after `patience` epochs without an
/// improvement larger than `min_delta` and restores the best weights, which
/// it also does when `interrupted()` turns true. An epoch whose training
/// loss is not finite (a learning rate too large, say) ends training with
/// the weights of the epoch before (`History::diverged_at`): NaN weights
/// are never kept. `on_epoch` sees each epoch.
pub fn train(
    task: &dyn Trainable,
    cfg: &TrainConfig,
    interrupted: &dyn Fn() -> bool,
    on_epoch: &dyn Fn(&EpochRecord),
) -> Result<History> {
    cfg.check()?;
    // Weights may have changed since any bf16 shadow was cast.
    crate::nn::new_weights_generation();
    let (mut train_rows, validation_rows) = task.split(cfg.validation_fraction, cfg.seed);
    check_param(train_rows.len() >= 2, "validation_fraction", "leaves fewer than 2 cells to train on")?;
    let vs = task.var_store();
    // Data-parallel training when a process group is installed (`dist`).
    let par = match crate::dist::current() {
        Some(g) => Some(parallel::Parallel::start(g, task, cfg, train_rows.len(), validation_rows.len())?),
        None => None,
    };
    let world = par.as_ref().map_or(1, |p| p.group.world());
    let mut opt = Optimizer::new(vs, cfg)?;

    // A trailing minibatch of 1 or 2 cells is skipped: batch normalization
    // needs more than one cell, and so few cells only add noise. With
    // several ranks every rank needs two cells of it.
    let bs = cfg.batch_size;
    let n_train = train_rows.len();
    let min_len = if world > 1 { 2 * world } else { 0 };
    let used = |len: usize| (len >= 3 || n_train < bs) && len >= min_len;
    let steps_per_epoch = n_train / bs + usize::from(n_train % bs != 0 && used(n_train % bs));
    let warm_steps = (cfg.kl_warmup * (cfg.max_epochs * steps_per_epoch) as f64).round() as usize;
    let warm_epochs = cfg.kl_warmup_epochs;
    let kl_weight = |step: usize| {
        if warm_epochs > 0 {
            let epoch = step / steps_per_epoch.max(1);
            (cfg.kl_start + (1.0 - cfg.kl_start) * epoch as f64 / warm_epochs as f64).min(1.0)
        } else if warm_steps == 0 {
            1.0
        } else {
            (step as f64 / warm_steps as f64).min(1.0)
        }
    };

    let mut history = History { validation_cells: validation_rows.clone(), ..Default::default() };
    let mut best: Option<(f64, HashMap<String, Tensor>)> = None;
    let mut since_best = 0;
    let mut step = 0;
    let device = vs.device();
    // The weights at the end of the last epoch whose loss was finite.
    let mut last_finite = snapshot(vs);
    for epoch in 0..cfg.max_epochs {
        let t0 = Instant::now();
        task.epoch_order(&mut train_rows, cfg.seed.wrapping_add(1 + epoch as u64));
        let zero = || Tensor::zeros([], (Kind::Double, device));
        let (mut sum_loss, mut sum_rec, mut sum_kl) = (zero(), zero(), zero());
        let mut seen = 0usize;
        let mut last_w = kl_weight(step);
        task.start_epoch(epoch);
        let mut chunk_start = 0;
        for chunk in train_rows.chunks(bs) {
            if !used(chunk.len()) {
                continue;
            }
            let w = kl_weight(step);
            last_w = w;
            // With several ranks: this rank's cells of the minibatch (the
            // order is dealt to the ranks in turn), whose per-cell draws are
            // cut from the whole minibatch's; the loss is their share of the
            // minibatch mean (the ranks' gradients add up).
            let dealt;
            let (cells, _shard) = match &par {
                Some(p) => {
                    let (mine, guard) = p.share(chunk_start, chunk);
                    dealt = mine;
                    (&dealt[..], Some(guard))
                }
                None => (chunk, None),
            };
            chunk_start += chunk.len();
            let t = task.loss(cells, true);
            let per_cell = &t.reconstruction + &t.kl_warmup * w + &t.kl_fixed;
            let mean =
                if par.is_some() { per_cell.sum(Kind::Float) / chunk.len() as f64 } else { per_cell.mean(Kind::Float) };
            let loss = match &t.penalty {
                Some(p) => mean + p / world as f64,
                None => mean,
            };
            opt.zero_grad();
            loss.backward();
            let mut extra: Vec<(Tensor, Tensor)> = t.deferred.iter().filter_map(|d| d.gradient()).collect();
            let shadows: Vec<(Tensor, Tensor)> = t.deferred.iter().filter_map(|d| d.shadow()).collect();
            let stop = match &par {
                Some(p) => {
                    // Summed over the ranks in f32 (a bf16 gradient is exact in f32).
                    for (_, g) in &mut extra {
                        if g.kind() != Kind::Float {
                            *g = g.to_kind(Kind::Float);
                        }
                    }
                    p.reduce_gradients(&extra, interrupted())?
                }
                None => false,
            };
            opt.step(&extra, &shadows);
            task.after_step();
            tch::no_grad(|| {
                sum_loss += per_cell.detach().sum(Kind::Double);
                sum_rec += t.reconstruction.detach().sum(Kind::Double);
                sum_kl += (t.kl_warmup.detach() + t.kl_fixed.detach()).sum(Kind::Double);
            });
            seen += chunk.len();
            step += 1;
            if stop || (par.is_none() && interrupted()) {
                history.interrupted = true;
                break;
            }
        }
        task.end_epoch();
        if history.interrupted && seen == 0 {
            break;
        }
        let seen_f = seen.max(1) as f64;
        let mut sums = [sum_loss.double_value(&[]), sum_rec.double_value(&[]), sum_kl.double_value(&[])];
        let (val_elbo, val_rec, val_kl) = match &par {
            Some(p) => {
                let total = p.sum(&sums)?;
                sums.copy_from_slice(&total);
                p.average_buffers()?;
                task.before_validation(&train_rows);
                p.evaluate(task, &validation_rows, 1024)?
            }
            None => {
                task.before_validation(&train_rows);
                evaluate(task, &validation_rows, 1024)
            }
        };
        let train_rec = sums[1] / seen_f;
        let train_kl = sums[2] / seen_f;
        let record = EpochRecord {
            epoch: epoch + 1,
            kl_weight: last_w,
            train_loss: sums[0] / seen_f,
            train_elbo: train_rec + train_kl,
            train_reconstruction: train_rec,
            train_kl,
            validation_elbo: val_elbo,
            validation_reconstruction: val_rec,
            validation_kl: val_kl,
            seconds: t0.elapsed().as_secs_f64(),
        };
        on_epoch(&record);
        let monitored = if validation_rows.is_empty() { record.train_elbo } else { val_elbo };
        let finite = record.train_loss.is_finite();
        history.epochs.push(record);
        if !finite {
            history.diverged_at = Some(epoch + 1);
            restore(vs, &last_finite);
            history.best_epoch = epoch;
            break;
        }
        if history.interrupted {
            break;
        }
        if epoch + 1 < cfg.max_epochs {
            last_finite = snapshot(vs);
        }
        if kl_weight(step) >= 1.0 && monitored.is_finite() {
            match &best {
                Some((b, _)) if monitored >= b - cfg.min_delta => since_best += 1,
                _ => {
                    best = Some((monitored, snapshot(vs)));
                    history.best_epoch = epoch + 1;
                    since_best = 0;
                }
            }
            if cfg.early_stopping && since_best >= cfg.patience {
                history.stopped_early = true;
                break;
            }
        }
    }
    match &best {
        _ if history.diverged_at.is_some() => {}
        Some((_, saved)) if cfg.early_stopping || history.interrupted => restore(vs, saved),
        _ => history.best_epoch = history.epochs.len(),
    }
    history.train_cells = train_rows;
    history.train_cells.sort_unstable();
    Ok(history)
}
