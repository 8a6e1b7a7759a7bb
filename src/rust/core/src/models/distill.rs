//! Two-phase distillation (scDistill): a student learns a teacher's
//! batch-free embedding Z* and then a batch-aware decoder of the counts.
//!
//! Phase 1: encoder(log2(CPM + 1) of the encoder genes) → Z, loss
//! ‖Z − Z*‖² / d per cell on a standardized Z*; the encoder is
//! n_layers × [Linear → norm → ReLU → Dropout] → Linear. How Z* is
//! standardized is [`Target`]: by default (`Global`) centred per dimension
//! and divided by one number, its overall RMS, so that the student's Z (put
//! back in the teacher's units) keeps the teacher's geometry; `Cell`
//! (scDistill 0.3.1) standardizes each cell's row, and the encoder then ends
//! in a LayerNorm without affine parameters.
//! Phase 2: encoder frozen; decoder([Z, batch embedding]) → ρ = softmax,
//! counts ~ NB(μ = library · ρ, θ per gene), loss −log p per cell.
//! Both phases stop early on a held-out validation split (scDistill 0.3.1
//! watches the training loss).
//!
//! Corrected expression is the decoder's ρ for a reference batch.

use crate::data::{Categorical, CellsH5, CountMatrix, Csr, DiskCsr, Embedding, Rows};
use crate::device::seed_torch;
use crate::error::{check_param, invalid, Result};
use crate::io;
use crate::likelihood::{fused_log_kernel_rows, nb_log_kernel_rows, Likelihood, RawDecoded, SparseBatch};
use crate::nn::{linear, FcLayers, FcSpec, Norm, Pass};
use crate::train::{train, EpochRecord, History, LossTerms, TrainConfig, Trainable};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// Cells per inference minibatch.
const CHUNK: usize = 1024;

/// Architecture of a distilled student; saved with the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DistillConfig {
    /// Genes the encoder reads (log-normalized, `input_scale_factor`).
    pub n_input: usize,
    /// Genes the decoder writes.
    pub n_genes: usize,
    pub n_latent: usize,
    /// Width of the encoder's hidden layers (and of the decoder's unless
    /// `n_hidden_decoder` is set).
    pub n_hidden: usize,
    /// Width of the decoder's hidden layers; `None`: `n_hidden` (as every
    /// model saved before the two could differ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_hidden_decoder: Option<usize>,
    pub n_layers: usize,
    pub dropout: f64,
    /// Normalization in the encoder's hidden layers (the decoder has none).
    pub norm: Norm,
    pub n_batch: usize,
    pub batch_embedding: usize,
    /// The encoder's target; models saved before it existed learned `Cell`.
    #[serde(default = "Target::cell")]
    pub target: Target,
    /// The encoder reads log2(count / library · `input_scale_factor` + 1)
    /// of its genes: log2 CPM by default (10^6), as every model saved
    /// before the setting existed.
    #[serde(default = "per_million")]
    pub input_scale_factor: f64,
}

fn per_million() -> f64 {
    1e6
}

/// How the teacher's Z* is standardized into the encoder's target.
///
/// Standardizing each cell's row (`Cell`, scDistill 0.3.1) is not an
/// invertible map of the embedding: it drops each cell's mean over the
/// dimensions and its scale, so cells that differ from each other mostly by
/// how far they lie from the centre in one direction become the same point.
/// A student of that target cannot reproduce the teacher's clusters where
/// they differ that way. `Global` centres each dimension and divides by one
/// number (an affine map, distances kept up to a scale); the model stores
/// both and reports Z in the teacher's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    #[default]
    Global,
    Cell,
}

impl Target {
    fn cell() -> Target {
        Target::Cell
    }
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            n_input: 0,
            n_genes: 0,
            n_latent: 0,
            n_hidden: 256,
            n_hidden_decoder: Some(128),
            n_layers: 2,
            dropout: 0.1,
            norm: Norm::Layer,
            n_batch: 1,
            batch_embedding: 10,
            target: Target::Global,
            input_scale_factor: per_million(),
        }
    }
}

impl DistillConfig {
    pub fn decoder_width(&self) -> usize {
        self.n_hidden_decoder.unwrap_or(self.n_hidden)
    }

    pub fn check(&self) -> Result<()> {
        check_param(self.n_input >= 1, "n_input", "must be at least 1")?;
        check_param(self.n_genes >= 1, "n_genes", "must be at least 1")?;
        check_param(self.n_latent >= 2, "n_latent", "must be at least 2 (the teacher needs 2 or more dimensions)")?;
        check_param(self.n_hidden >= 1, "n_hidden", "must be at least 1")?;
        check_param(self.n_hidden_decoder != Some(0), "n_hidden_decoder", "must be at least 1")?;
        check_param(self.n_layers >= 1, "n_layers", "must be at least 1")?;
        check_param((0.0..1.0).contains(&self.dropout), "dropout", "must be in [0, 1)")?;
        check_param(self.n_batch >= 1, "n_batch", "must be at least 1")?;
        check_param(self.batch_embedding >= 1, "batch_embedding", "must be at least 1")?;
        let sf = self.input_scale_factor;
        check_param(sf.is_finite() && sf > 0.0, "input_scale_factor", "must be a positive number")
    }
}

/// The student: encoder and decoder in one variable store (paths
/// `encoder/…` and `decoder/…`).
pub struct Student {
    pub cfg: DistillConfig,
    pub vs: nn::VarStore,
    enc_fc: FcLayers,
    enc_out: nn::Linear,
    dec_fc: FcLayers,
    batch_emb: Tensor,
    scale_head: nn::Linear,
    log_theta: Tensor,
    /// `Global` target: per-dimension centre and the one scale of Z*
    /// (buffers saved with the weights).
    z_centre: Option<Tensor>,
    z_scale: Option<Tensor>,
    /// The output head's product in bf16 while training
    /// ([`Student::set_bf16_training`]).
    bf16_head: crate::nn::Bf16Switch,
}

impl Student {
    pub fn new(cfg: DistillConfig, device: Device) -> Result<Student> {
        cfg.check()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let enc = &root / "encoder";
        let enc_fc = FcLayers::new(
            &(&enc / "fc"),
            FcSpec {
                n_in: cfg.n_input,
                n_hidden: cfg.n_hidden,
                n_layers: cfg.n_layers,
                n_cov: 0,
                dropout: cfg.dropout,
                norm: cfg.norm,
                inject_all: false,
                sparse_input: false,
            },
        );
        let enc_out = linear(&enc / "out", cfg.n_hidden, cfg.n_latent);
        let dec = &root / "decoder";
        let batch_emb = (&dec).randn_standard("batch_embedding", &[cfg.n_batch as i64, cfg.batch_embedding as i64]);
        let dec_fc = FcLayers::new(
            &(&dec / "fc"),
            FcSpec {
                n_in: cfg.n_latent + cfg.batch_embedding,
                n_hidden: cfg.decoder_width(),
                n_layers: cfg.n_layers,
                n_cov: 0,
                dropout: cfg.dropout,
                norm: Norm::None,
                inject_all: false,
                sparse_input: false,
            },
        );
        let scale_head = linear(&dec / "scale", cfg.decoder_width(), cfg.n_genes);
        let log_theta = (&dec).zeros("log_theta", &[cfg.n_genes as i64]);
        let (z_centre, z_scale) = match cfg.target {
            Target::Global => {
                let t = &root / "target";
                (Some(t.zeros_no_train("centre", &[cfg.n_latent as i64])), Some(t.ones_no_train("scale", &[1])))
            }
            Target::Cell => (None, None),
        };
        Ok(Student {
            cfg,
            vs,
            enc_fc,
            enc_out,
            dec_fc,
            batch_emb,
            scale_head,
            log_theta,
            z_centre,
            z_scale,
            bf16_head: Default::default(),
        })
    }

    /// Mixed-precision training of the encoder's first layer and the
    /// decoder's output head when asked and the device has native bf16
    /// (see [`TrainConfig::bf16`]); returns whether it is on.
    pub fn set_bf16_training(&self, asked: bool) -> bool {
        let on = crate::nn::bf16_on(asked, self.device());
        self.enc_fc.set_bf16_training(on);
        self.bf16_head.set(on);
        on
    }

    /// The encoder's target: Z* standardized as `cfg.target` says, read a
    /// minibatch at a time (no copy of Z*); for `Global`, `global` is Z*'s
    /// centre and scale ([`global_scale`]), which the student stores.
    fn set_target<'a>(&self, z: TargetSource<'a>, global: Option<(Vec<f64>, f64)>) -> TargetRows<'a> {
        if let (Some(centre), Some(scale), Some((c, sd))) = (&self.z_centre, &self.z_scale, &global) {
            let (mut centre, mut scale) = (centre.shallow_clone(), scale.shallow_clone());
            let values: Vec<f32> = c.iter().map(|&v| v as f32).collect();
            tch::no_grad(|| {
                centre.copy_(&Tensor::from_slice(&values).to_device(self.device()));
                scale.copy_(&Tensor::from_slice(&[*sd as f32]).to_device(self.device()));
            });
        }
        TargetRows { z, global }
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// See [`FcLayers::recalibrate_batch_norm`]; over the cells `rows` of
    /// `input`.
    fn recalibrate_encoder(&self, input: &Csr, rows: &[usize]) {
        let dev = self.device();
        self.enc_fc.recalibrate_batch_norm(&|c| {
            let block = rows.chunks(CHUNK).nth(c)?;
            Some((crate::data::rows_to_tensor(input, block, dev), None))
        });
    }

    /// Z for log2(CPM + 1) input `x` ([cells, n_input]), in the teacher's
    /// units (`Global`) or standardized per cell (`Cell`).
    pub fn encode(&self, x: &Tensor, train: impl Into<Pass>) -> Tensor {
        let z = self.encode_standardized(x, train);
        match (&self.z_centre, &self.z_scale) {
            (Some(c), Some(s)) => z * s + c,
            _ => z,
        }
    }

    /// Z on the scale of the encoder's target.
    fn encode_standardized(&self, x: &Tensor, train: impl Into<Pass>) -> Tensor {
        let h = self.enc_fc.forward(x, None, train);
        let z = self.enc_out.forward(&h);
        match self.cfg.target {
            Target::Global => z,
            Target::Cell => z.layer_norm([self.cfg.n_latent as i64], None::<Tensor>, None::<Tensor>, 1e-5, false),
        }
    }

    /// ρ (rows sum to 1) for latent `z` and batch codes `batch` (int64).
    pub fn decode_scale(&self, z: &Tensor, batch: &Tensor, train: impl Into<Pass>) -> Tensor {
        self.decode_logits(z, batch, train).softmax(-1, Kind::Float)
    }

    /// The decoder's logits, ρ = softmax(logits).
    fn decode_logits(&self, z: &Tensor, batch: &Tensor, train: impl Into<Pass>) -> Tensor {
        let e = self.batch_emb.index_select(0, batch);
        // The decoder reads Z on the target's scale.
        let z = match (&self.z_centre, &self.z_scale) {
            (Some(c), Some(s)) => (z - c) / s,
            _ => z.shallow_clone(),
        };
        let pass = train.into();
        let h = self.dec_fc.forward(&Tensor::cat(&[&z, &e], 1), None, pass);
        self.bf16_head.linear(&h, &self.scale_head, pass)
    }

    pub fn theta(&self) -> Tensor {
        self.log_theta.exp()
    }

    fn set_encoder_trainable(&self, on: bool) {
        for (name, v) in self.vs.variables() {
            if name.starts_with("encoder") && v.requires_grad() != on {
                // Running statistics of batch norm are buffers, not parameters.
                if v.is_floating_point() {
                    let _ = v.set_requires_grad(on);
                }
            }
        }
    }
}

/// Z*, the teacher's embedding the encoder learns: in memory (an R matrix
/// is read in place, in either layout), or the cells of an HDF5 dataset,
/// read a block at a time (counts on disk, whose Z* then need not be held:
/// 2 GB at 5·10^6 cells and 50 dimensions).
#[derive(Debug, Clone)]
pub enum Teacher<'a> {
    Memory(Embedding<'a>),
    File(CellsH5),
}

impl<'a> From<Embedding<'a>> for Teacher<'a> {
    fn from(z: Embedding<'a>) -> Self {
        Teacher::Memory(z)
    }
}

impl Teacher<'_> {
    pub fn n(&self) -> usize {
        match self {
            Teacher::Memory(z) => z.n,
            Teacher::File(f) => f.n,
        }
    }

    pub fn d(&self) -> usize {
        match self {
            Teacher::Memory(z) => z.d,
            Teacher::File(f) => f.d,
        }
    }

    /// Every cell's row in order, `FILE_BLOCK` cells at a time:
    /// `f(first cell, rows)`, row-major.
    fn for_each_block(&self, f: &mut dyn FnMut(usize, &[f64])) -> Result<()> {
        let (n, d) = (self.n(), self.d());
        for start in (0..n).step_by(FILE_BLOCK) {
            let end = (start + FILE_BLOCK).min(n);
            let rows = match self {
                Teacher::Memory(z) => {
                    let mut rows = vec![0.0; (end - start) * d];
                    rows.chunks_mut(d).enumerate().for_each(|(k, r)| z.row_into(start + k, r));
                    rows
                }
                Teacher::File(file) => file.read(start, end - start)?,
            };
            f(start, &rows);
        }
        Ok(())
    }

    /// An error naming the first cell with a missing or infinite value.
    fn check_finite(&self) -> Result<()> {
        let bad = match self {
            Teacher::Memory(z) => z.values.iter().position(|v| !v.is_finite()).map(|i| z.at(i).0),
            Teacher::File(_) => {
                let mut bad = None;
                self.for_each_block(&mut |start, rows| {
                    bad = bad.or_else(|| first_not_finite(start, rows, self.d()));
                })?;
                bad
            }
        };
        not_finite(bad)
    }
}

/// The first cell of `rows` (cells `start..`, `d` values each, row-major)
/// with a missing or infinite value.
fn first_not_finite(start: usize, rows: &[f64], d: usize) -> Option<usize> {
    rows.iter().position(|v| !v.is_finite()).map(|i| start + i / d)
}

/// An error naming `cell`, a teacher's cell with a value that is not finite.
fn not_finite(cell: Option<usize>) -> Result<()> {
    match cell {
        Some(cell) => invalid!("the teacher embedding has a missing or infinite value (cell {})", cell + 1),
        None => Ok(()),
    }
}

/// Blocks of cells of a file (Z*, or Z) read most recently, row-major, the
/// last one used at the end. For cells on disk the blocks are those of the
/// counts (`DiskCsr::block` cells), and as many are kept as a streamed
/// window has, and a few more: a window's cells come from blocks spread
/// over the whole file, and its minibatches from all of them, so each
/// block is read once per epoch. (Blocks of 16,384 cells, 8 kept, were
/// read again for nearly every minibatch: a first epoch at 10^6 cells ran
/// for over ten minutes instead of two.)
struct BlockCache {
    block: usize,
    keep: usize,
    kept: std::sync::Mutex<Vec<(usize, std::sync::Arc<Vec<f64>>)>>,
}

impl BlockCache {
    fn for_disk(disk: &DiskCsr) -> BlockCache {
        // In tests a few, so that small data are read again as blocks leave.
        let keep = if cfg!(test) { 4 } else { disk.window_blocks + 8 };
        BlockCache { block: disk.block, keep, kept: Default::default() }
    }

    /// Block `b` of `file`. A read error is a panic naming the file, as a
    /// failed read of the counts is (the loss returns no `Result`); R turns
    /// it into an error.
    fn block(&self, file: &CellsH5, b: usize) -> std::sync::Arc<Vec<f64>> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = kept.iter().rposition(|(i, _)| *i == b) {
            let hit = kept.remove(k);
            kept.push(hit.clone());
            return hit.1;
        }
        let start = b * self.block;
        let rows = file.read(start, self.block.min(file.n - start)).unwrap_or_else(|e| panic!("{e}"));
        if kept.len() >= self.keep {
            kept.remove(0);
        }
        kept.push((b, std::sync::Arc::new(rows)));
        kept[kept.len() - 1].1.clone()
    }

    /// Row `i` of `file` (`d` values) through the cache.
    fn row_into(&self, file: &CellsH5, i: usize, out: &mut [f64]) {
        let k = (i % self.block) * file.d;
        out.copy_from_slice(&self.block(file, i / self.block)[k..k + file.d]);
    }
}

/// Cells read at once by the passes over all of a file of Z*; in tests
/// fewer, so that small data span several.
const FILE_BLOCK: usize = if cfg!(test) { 100 } else { DISK_BLOCK };

/// Where the encoder's targets are read: Z* in memory, or in a file (only
/// with counts on disk) through a cache of the counts' blocks.
enum TargetSource<'a> {
    Memory(Embedding<'a>),
    File(CellsH5, BlockCache),
}

/// The encoder's target of given cells: rows of Z* minus the centre over
/// the scale (`global`), or each standardized to mean 0 and population
/// standard deviation 1 (`None`), as scDistill does with the teacher.
struct TargetRows<'a> {
    z: TargetSource<'a>,
    global: Option<(Vec<f64>, f64)>,
}

impl TargetRows<'_> {
    /// The targets of `rows`, row-major.
    fn rows(&self, rows: &[usize]) -> Vec<f32> {
        let d = match &self.z {
            TargetSource::Memory(z) => z.d,
            TargetSource::File(f, _) => f.d,
        };
        let mut out = Vec::with_capacity(rows.len() * d);
        let mut row = vec![0.0; d];
        for &i in rows {
            match &self.z {
                TargetSource::Memory(z) => z.row_into(i, &mut row),
                TargetSource::File(f, cache) => cache.row_into(f, i, &mut row),
            }
            match &self.global {
                Some((c, sd)) => out.extend(row.iter().zip(c).map(|(v, m)| ((v - m) / sd) as f32)),
                None => {
                    let m = row.iter().sum::<f64>() / d as f64;
                    let sd = (row.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / d as f64).sqrt();
                    out.extend(row.iter().map(|v| ((v - m) / (sd + 1e-5)) as f32));
                }
            }
        }
        out
    }
}

/// Per-dimension means of `z` and the root mean square of the centred
/// values over all cells and dimensions (two passes over its cells); an
/// error naming the first cell whose values are not all finite (the first
/// pass is the check: Z* in a file is read twice, not three times).
pub fn global_scale(z: &Teacher) -> Result<(Vec<f64>, f64)> {
    let (n, d) = (z.n().max(1), z.d());
    let mut c = vec![0.0; d];
    let mut bad = None;
    z.for_each_block(&mut |start, rows| {
        bad = bad.or_else(|| first_not_finite(start, rows, d));
        for row in rows.chunks(d) {
            c.iter_mut().zip(row).for_each(|(m, v)| *m += v);
        }
    })?;
    not_finite(bad)?;
    c.iter_mut().for_each(|m| *m /= n as f64);
    let mut ss = 0.0;
    z.for_each_block(&mut |_, rows| {
        for row in rows.chunks(d) {
            ss += row.iter().zip(&c).map(|(v, m)| (v - m) * (v - m)).sum::<f64>();
        }
    })?;
    let sd = (ss / (n * d) as f64).sqrt();
    Ok((c, if sd > 0.0 { sd } else { 1.0 }))
}

/// Where the student's Z of every training cell goes.
pub use super::LatentOut;

/// A student's training cells as both phases read them.
enum TrainingCells<'a> {
    /// The encoder's input (log-normalized), and the decoder genes' counts.
    Memory { input: Csr, counts: Csr },
    /// Counts on disk, streamed; `scale` is `input_scale_factor` / each
    /// cell's library size (over all the matrix's genes); `position` each
    /// gene's column in the encoder's input (`u32::MAX`: none);
    /// `decoder_genes` `None`: all.
    Disk {
        disk: &'a DiskCsr,
        input_genes: &'a [usize],
        position: Vec<u32>,
        decoder_genes: Option<&'a [usize]>,
        scale: Vec<f64>,
    },
}

/// log2(count · scale + 1), the encoder's input on disk: in f32 (a
/// minibatch's worth per step; in f64 as in memory the logarithm alone made
/// an epoch 1.8 times as long as from memory). It differs from the f64
/// value in memory by an ulp or two.
#[inline]
fn log_normalized_f32(count: f32, scale: f64) -> f32 {
    (count * scale as f32 + 1.0).log2()
}

/// Cells read at once by the passes over every cell on disk, and encoded
/// at once by the Z pass in memory too.
const DISK_BLOCK: usize = 16_384;

impl TrainingCells<'_> {
    fn n(&self) -> usize {
        match self {
            TrainingCells::Memory { input, .. } => input.n_rows,
            TrainingCells::Disk { disk, .. } => disk.n_rows(),
        }
    }

    /// The encoder's input (log-normalized by `scale`) of the encoder's genes
    /// of `raw`, the counts on disk of the cells `rows` (the library sizes
    /// over all genes, as in memory).
    fn input_of(input_genes: &[usize], scale: &[f64], raw: &Csr, rows: &[usize]) -> Csr {
        raw.select_columns(input_genes).map_values(|r, v| log_normalized_f32(v, scale[rows[r]]))
    }

    /// The encoder's input of `rows`, read from the epoch's stream when
    /// `streamed`.
    fn input(&self, rows: &[usize], streamed: bool, device: Device) -> Tensor {
        match self {
            TrainingCells::Memory { input, .. } => crate::data::rows_to_tensor(input, rows, device),
            // Straight from the cells' counts into the dense input.
            TrainingCells::Disk { disk, input_genes, position, scale, .. } => {
                Rows::Disk(disk).with_rows(rows, streamed, |m, _| {
                    let p = input_genes.len();
                    let mut x = vec![0f32; rows.len() * p];
                    for (r, dst) in x.chunks_mut(p).enumerate() {
                        let (idx, val) = m.row(r);
                        for (&j, &v) in idx.iter().zip(val) {
                            let k = position[j as usize];
                            if k != u32::MAX {
                                dst[k as usize] = log_normalized_f32(v, scale[rows[r]]);
                            }
                        }
                    }
                    Tensor::from_slice(&x).view([rows.len() as i64, p as i64]).to_device(device)
                })
            }
        }
    }

    /// The decoder genes' counts of `rows`.
    fn counts(&self, rows: &[usize], streamed: bool, device: Device) -> SparseBatch {
        match self {
            TrainingCells::Memory { counts, .. } => SparseBatch::from_csr(counts, rows, device),
            TrainingCells::Disk { disk, decoder_genes, .. } => {
                Rows::Disk(disk).with_rows(rows, streamed, |m, local| match decoder_genes {
                    Some(keep) => SparseBatch::from_csr(&m.select_columns(keep), local, device),
                    None => SparseBatch::from_csr(m, local, device),
                })
            }
        }
    }

    /// The encoder's input of `rows` (sorted) in memory; on disk they are
    /// read in runs.
    fn read_input(&self, rows: &[usize]) -> Result<Csr> {
        match self {
            TrainingCells::Memory { input, .. } => Ok(input.select_rows(rows)),
            TrainingCells::Disk { disk, input_genes, scale, .. } => {
                Ok(Self::input_of(input_genes, scale, &disk.read_rows(rows)?, rows))
            }
        }
    }

    fn split(&self, validation_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        match self {
            TrainingCells::Disk { disk, .. } => disk.split(validation_fraction, seed),
            TrainingCells::Memory { .. } => crate::data::train_validation_split(self.n(), validation_fraction, seed),
        }
    }

    fn epoch_order(&self, rows: &mut Vec<usize>, seed: u64) {
        match self {
            TrainingCells::Disk { disk, .. } => {
                *rows = disk.epoch_order(rows, seed, crate::dist::current().map(|g| (g.rank(), g.world())))
            }
            TrainingCells::Memory { .. } => {
                use rand::seq::SliceRandom;
                use rand::SeedableRng;
                rows.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed))
            }
        }
    }

    fn end_epoch(&self) {
        if let TrainingCells::Disk { disk, .. } = self {
            disk.end_stream();
        }
    }

    /// Z of every cell from the student's encoder, in blocks of
    /// `DISK_BLOCK` cells (see [`LatentBlocks`]), with the decoder genes'
    /// log library sizes and Σ log x! (one pass over cells on disk, its
    /// progress reported as `progress(done, total)`, interruptible). For
    /// cells on disk with `file`, each block goes to that file as it is
    /// encoded, and the decoder reads it back from there.
    fn latent_and_totals(
        &self,
        s: &Student,
        file: Option<&CellsH5>,
        progress: &dyn Fn(usize, usize),
        interrupted: &dyn Fn() -> bool,
    ) -> Result<(LatentStore, Vec<f32>, Vec<f32>)> {
        let (n, d) = (self.n(), s.cfg.n_latent);
        let log_library = |m: &Csr| -> Vec<f32> { m.row_sums().iter().map(|&t| t.max(1.0).ln() as f32).collect() };
        let mut z = LatentBlocks { d, blocks: Vec::with_capacity(n.div_ceil(DISK_BLOCK)) };
        match self {
            TrainingCells::Memory { input, counts } => {
                for start in (0..n).step_by(DISK_BLOCK) {
                    z.blocks.push(latent_rows(s, input, start, (start + DISK_BLOCK).min(n)));
                }
                Ok((LatentStore::Held(z), log_library(counts), super::log_factorial(counts)))
            }
            TrainingCells::Disk { disk, decoder_genes, input_genes, scale, .. } => {
                let (mut lib, mut fact) = (Vec::with_capacity(n), Vec::with_capacity(n));
                for start in (0..n).step_by(DISK_BLOCK) {
                    if interrupted() {
                        return Err(crate::error::Error::Interrupted);
                    }
                    let rows: Vec<usize> = (start..(start + DISK_BLOCK).min(n)).collect();
                    let raw = disk.read_range(start, start + rows.len())?;
                    let block = latent_of(s, &Self::input_of(input_genes, scale, &raw, &rows));
                    match file {
                        Some(f) => f.write(start, &block.iter().map(|&v| f64::from(v)).collect::<Vec<_>>())?,
                        None => z.blocks.push(block),
                    }
                    let counts = match decoder_genes {
                        Some(keep) => raw.select_columns(keep),
                        None => raw,
                    };
                    lib.extend(log_library(&counts));
                    fact.extend(super::log_factorial(&counts));
                    progress(start + rows.len(), n);
                }
                crate::device::release_free_memory();
                let z = match file {
                    Some(f) => LatentStore::File(f.clone(), BlockCache::for_disk(disk)),
                    None => LatentStore::Held(z),
                };
                Ok((z, lib, fact))
            }
        }
    }
}

/// Z of every cell as the encoder gives it, in single precision and in
/// blocks of `DISK_BLOCK` cells (row-major): what the decoder's phase
/// reads. Only after that phase is it written into the caller's
/// `LatentOut` (R's cells × d double matrix, or a file), each block freed
/// as it is written, so the two are
/// never held whole at once, and never beside the phase's windows of cells
/// and training buffers (at 5·10^6 cells and 50 dimensions: 1 GB here, and
/// the 2 GB matrix filled only at the end). The values are those the
/// decoder would read back from the double matrix.
struct LatentBlocks {
    d: usize,
    blocks: Vec<Vec<f32>>,
}

impl LatentBlocks {
    #[inline]
    fn row(&self, i: usize) -> &[f32] {
        let k = (i % DISK_BLOCK) * self.d;
        &self.blocks[i / DISK_BLOCK][k..k + self.d]
    }

    /// Into `out`, freeing each block once written. Freed blocks stay
    /// with the allocator until handed back, which is done every 64 blocks
    /// (without it, all of Z was held twice at the end: the process peaked
    /// at 6.56 GB, not about 5.6, at 5·10^6 cells).
    fn write_to(self, out: &mut LatentOut) -> Result<()> {
        let mut cells = out.in_order(self.d);
        for (b, block) in self.blocks.into_iter().enumerate() {
            cells.push(b * DISK_BLOCK, &block)?;
            drop(block);
            if b % 64 == 63 {
                crate::device::release_free_memory();
            }
        }
        cells.finish()?;
        crate::device::release_free_memory();
        Ok(())
    }
}

/// Z of every cell for the decoder's phase: held (see [`LatentBlocks`]), or
/// for cells on disk whose Z goes to a file, written there by the Z pass and
/// read back a block at a time (1 GB less at 5·10^6 cells and 50
/// dimensions).
enum LatentStore {
    Held(LatentBlocks),
    File(CellsH5, BlockCache),
}

impl LatentStore {
    /// The rows `rows` of Z, row-major, appended to `out`.
    fn extend_rows(&self, rows: &[usize], out: &mut Vec<f32>) {
        match self {
            LatentStore::Held(z) => rows.iter().for_each(|&r| out.extend_from_slice(z.row(r))),
            LatentStore::File(f, cache) => {
                let mut row = vec![0.0; f.d];
                for &r in rows {
                    cache.row_into(f, r, &mut row);
                    out.extend(row.iter().map(|&v| v as f32));
                }
            }
        }
    }
}

/// Up to `max` of the sorted `rows`, in runs of 256 consecutive ones spread
/// evenly over them: a sample of cells on disk read with few reads.
fn sample_in_runs(rows: &[usize], max: usize) -> Vec<usize> {
    const RUN: usize = 256;
    if rows.len() <= max {
        return rows.to_vec();
    }
    let n_runs = max.div_ceil(RUN).max(2);
    (0..n_runs).flat_map(|k| &rows[k * (rows.len() - RUN) / (n_runs - 1)..][..RUN]).copied().collect()
}

/// The split, the epoch's order and its end, as the task's `cells` have them.
macro_rules! cells_split_and_order {
    () => {
        fn split(&self, validation_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
            self.cells.split(validation_fraction, seed)
        }

        fn epoch_order(&self, rows: &mut Vec<usize>, seed: u64) {
            self.cells.epoch_order(rows, seed)
        }

        fn end_epoch(&self) {
            self.cells.end_epoch()
        }
    };
}

/// Phase 1: encoder input and teacher target.
struct EncoderTask<'a> {
    student: &'a Student,
    cells: &'a TrainingCells<'a>,
    target: &'a TargetRows<'a>,
    /// On disk: the training cells whose statistics the batch norms take
    /// before validation (read once).
    sample: std::sync::Mutex<Option<Csr>>,
}

impl Trainable for EncoderTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.student.vs
    }
    fn n_cells(&self) -> usize {
        self.cells.n()
    }
    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        let dev = self.student.device();
        let d = self.student.cfg.n_latent;
        let x = self.cells.input(rows, train, dev);
        let target = Tensor::from_slice(&self.target.rows(rows)).view([rows.len() as i64, d as i64]).to_device(dev);
        let z = self.student.encode_standardized(&x, train);
        let mse = (z - target).square().mean_dim(-1, false, Kind::Float);
        LossTerms::plain(mse)
    }

    /// The validation loss, and so early stopping and the weights kept, is
    /// that of inference: batch norms with the statistics of the training
    /// cells (up to 8,192 of them, evenly spaced; on disk, in runs) as the
    /// weights now are. Their running averages (momentum 0.01) lag far
    /// behind on small data: on the 571-cell CellBench example with 256
    /// hidden units the validation MSE rose for 10 epochs while the
    /// training MSE fell, and early stopping kept epoch 1.
    fn before_validation(&self, train_rows: &[usize]) {
        match self.cells {
            TrainingCells::Memory { input, .. } => {
                let step = train_rows.len().div_ceil(8192).max(1);
                let rows: Vec<usize> = train_rows.iter().step_by(step).copied().collect();
                self.student.recalibrate_encoder(input, &rows);
            }
            TrainingCells::Disk { .. } => {
                let mut sample = self.sample.lock().unwrap_or_else(|e| e.into_inner());
                let x = sample.get_or_insert_with(|| {
                    self.cells.read_input(&sample_in_runs(train_rows, 8192)).unwrap_or_else(|e| panic!("{e}"))
                });
                self.student.recalibrate_encoder(x, &(0..x.n_rows).collect::<Vec<_>>());
            }
        }
    }

    cells_split_and_order!();
}

/// Phase 2: the frozen encoder's Z of every cell, counts and batches.
struct DecoderTask<'a> {
    student: &'a Student,
    /// Z of every cell.
    z: &'a LatentStore,
    cells: &'a TrainingCells<'a>,
    batch: &'a [u32],
    log_library: &'a [f32],
    log_factorial: &'a [f32],
}

impl Trainable for DecoderTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.student.vs
    }
    fn n_cells(&self) -> usize {
        self.cells.n()
    }
    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        let s = self.student;
        let dev = s.device();
        let d = s.cfg.n_latent;
        let mut zb = Vec::with_capacity(rows.len() * d);
        self.z.extend_rows(rows, &mut zb);
        let z = Tensor::from_slice(&zb).view([rows.len() as i64, d as i64]).to_device(dev);
        let pick = |v: &[f32]| Tensor::from_slice(&rows.iter().map(|&r| v[r]).collect::<Vec<f32>>()).to_device(dev);
        let batch =
            Tensor::from_slice(&rows.iter().map(|&r| self.batch[r] as i64).collect::<Vec<i64>>()).to_device(dev);
        let logits = s.decode_logits(&z, &batch, train);
        let log_library = pick(self.log_library).unsqueeze(1);
        let nz = self.cells.counts(rows, train, dev);
        let raw = RawDecoded {
            family: Likelihood::Nb,
            logits: &logits,
            log_library: &log_library,
            log_theta: Some(&s.log_theta),
            pi_logits: None,
        };
        let kernel = fused_log_kernel_rows(&nz, &raw).unwrap_or_else(|| {
            let mu = log_library.exp() * logits.softmax(-1, Kind::Float);
            nb_log_kernel_rows(&nz, &mu, &s.theta().unsqueeze(0), 1e-8)
        });
        LossTerms::plain(-(kernel - pick(self.log_factorial)))
    }

    cells_split_and_order!();
}

/// Everything needed to use a trained student again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistillMeta {
    pub config: DistillConfig,
    /// Genes of the encoder's input, in order.
    pub input_genes: Vec<String>,
    /// Genes of the decoder's output, in order.
    pub genes: Vec<String>,
    pub batch_name: String,
    pub batch_levels: Vec<String>,
    pub train_encoder: TrainConfig,
    pub train_decoder: TrainConfig,
    pub history_encoder: Vec<EpochRecord>,
    pub history_decoder: Vec<EpochRecord>,
    pub best_epoch_encoder: usize,
    pub best_epoch_decoder: usize,
    pub stopped_early: [bool; 2],
    pub interrupted: bool,
    /// Phase and epoch whose loss was not finite (training stopped there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged_at: Option<(String, usize)>,
    pub n_cells: usize,
    pub validation_cells: Vec<usize>,
    /// Description of the teacher (free text from the caller).
    pub teacher: String,
    /// The covariates the teacher kept (Harmony's `protect`), as the caller
    /// names them; `None` in files from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_protects: Option<Vec<String>>,
    /// Batches added by `map_query()` (the last levels of `batch_levels`).
    #[serde(default)]
    pub query_batches: Vec<String>,
}

/// A trained student and its description.
pub struct DistillModel {
    pub meta: DistillMeta,
    pub student: Student,
}

impl std::fmt::Debug for DistillModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistillModel").field("config", &self.meta.config).finish_non_exhaustive()
    }
}

/// Which phase an epoch belongs to, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Encoder,
    Decoder,
}

/// Training data of [`DistillModel::fit`].
pub struct DistillData<'a> {
    /// Raw counts of every gene (decoder genes are selected by `decoder_genes`).
    pub counts: DistillCounts<'a>,
    /// Columns of `counts` the encoder reads.
    pub input_genes: &'a [usize],
    /// Columns of `counts` the decoder writes.
    pub decoder_genes: &'a [usize],
    pub batch: &'a Categorical,
    /// Teacher embedding, cells × d (an R matrix is read in place), or
    /// its file.
    pub teacher: Teacher<'a>,
    pub teacher_name: String,
    /// The covariates the teacher kept (kept in the model's description).
    pub teacher_protects: Vec<String>,
}

/// The counts a student trains on.
#[derive(Clone, Copy)]
pub enum DistillCounts<'a> {
    Memory(&'a CountMatrix),
    /// Counts that stay on disk, streamed in both phases (see
    /// `data::DiskCsr`), with their genes' names and each cell's total
    /// count over all genes (`Scan::row_sums`, or the teacher's pass:
    /// `prep::DiskPca::library`).
    Disk {
        disk: &'a DiskCsr,
        genes: &'a [String],
        library: &'a [f64],
    },
}

impl<'a> From<&'a CountMatrix> for DistillCounts<'a> {
    fn from(m: &'a CountMatrix) -> Self {
        DistillCounts::Memory(m)
    }
}

impl DistillCounts<'_> {
    fn n_cells(&self) -> usize {
        match self {
            DistillCounts::Memory(m) => m.n_cells(),
            DistillCounts::Disk { disk, .. } => disk.n_rows(),
        }
    }

    fn genes(&self) -> &[String] {
        match self {
            DistillCounts::Memory(m) => &m.genes,
            DistillCounts::Disk { genes, .. } => genes,
        }
    }
}

/// log2(count / library · `scale_factor` + 1) of the columns `keep`, with
/// library sizes over all genes.
pub fn encoder_input(counts: &CountMatrix, keep: &[usize], scale_factor: f64) -> Csr {
    crate::prep::log_normalized(counts, scale_factor).select_columns(keep)
}

impl DistillModel {
    /// Runs both phases. `config.n_input`, `n_genes`, `n_latent` and
    /// `n_batch` are filled in from the data.
    pub fn fit(
        data: &DistillData,
        config: DistillConfig,
        train_encoder: TrainConfig,
        train_decoder: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(Phase, &EpochRecord),
    ) -> Result<DistillModel> {
        let mut z = vec![0.0; data.teacher.n() * data.teacher.d()];
        let z = LatentOut::Memory(&mut z);
        Self::fit_into(data, config, train_encoder, train_decoder, device, interrupted, on_epoch, &|_, _| {}, z)
    }

    /// `fit`, writing the student's Z of every training cell, which the
    /// decoder's phase computes, into `z` (an R matrix allocated by the
    /// caller, or an HDF5 dataset), at the end of the fit (see
    /// `LatentBlocks`): no further pass over cells on disk.
    /// `pass(done, total)` reports that pass over cells on disk.
    #[allow(clippy::too_many_arguments)]
    pub fn fit_into(
        data: &DistillData,
        mut config: DistillConfig,
        mut train_encoder: TrainConfig,
        mut train_decoder: TrainConfig,
        device: Device,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(Phase, &EpochRecord),
        pass: &dyn Fn(usize, usize),
        mut z: LatentOut,
    ) -> Result<DistillModel> {
        let n = data.counts.n_cells();
        let n_genes = data.counts.genes().len();
        let t = &data.teacher;
        let d = t.d();
        let size = match t {
            Teacher::Memory(e) => e.values.len(),
            Teacher::File(f) => f.n * d,
        };
        if t.n() != n || size != n * d {
            return invalid!("the teacher embedding has {size} values; expected cells ({n}) × dimensions ({d})");
        }
        let room = z.len();
        if room != n * d {
            return invalid!("room for {room} latent values; expected cells ({n}) × dimensions ({d})");
        }
        let source = match (&data.counts, t) {
            (_, Teacher::Memory(z)) => TargetSource::Memory(*z),
            (DistillCounts::Disk { disk, .. }, Teacher::File(f)) => {
                TargetSource::File(f.clone(), BlockCache::for_disk(disk))
            }
            (DistillCounts::Memory(_), Teacher::File(f)) => {
                return invalid!(
                    "the teacher embedding in '{}' is read a block at a time, for counts on disk only; \
                     with counts in memory it must be in memory too",
                    f.path
                )
            }
        };
        if data.batch.codes.len() != n {
            return invalid!("{} batch values for {} cells", data.batch.codes.len(), n);
        }
        if let DistillCounts::Disk { library, .. } = data.counts {
            if library.len() != n {
                return invalid!("{} library sizes for a matrix of {n} cells", library.len());
            }
        }
        if data.input_genes.is_empty() || data.decoder_genes.is_empty() {
            return invalid!("the encoder and the decoder need at least one gene each");
        }
        if let Some(&j) = data.input_genes.iter().chain(data.decoder_genes).find(|&&j| j >= n_genes) {
            return invalid!("gene column {} is outside the {n_genes} genes", j + 1);
        }
        config.n_input = data.input_genes.len();
        config.n_genes = data.decoder_genes.len();
        config.n_latent = d;
        config.n_batch = data.batch.n_levels();
        // Every check before the global generator is seeded.
        config.check()?;
        train_encoder.check()?;
        train_decoder.check()?;
        // Z*'s centre and scale for a global target, whose first pass checks
        // its values (passes over Z* in a file, so after the cheap checks);
        // otherwise a check of its own.
        let global = match config.target {
            Target::Global => Some(global_scale(t)?),
            Target::Cell => {
                t.check_finite()?;
                None
            }
        };
        let cells = match data.counts {
            DistillCounts::Memory(m) => TrainingCells::Memory {
                input: encoder_input(m, data.input_genes, config.input_scale_factor),
                counts: m.csr.select_columns(data.decoder_genes),
            },
            DistillCounts::Disk { disk, library, .. } => {
                let all =
                    data.decoder_genes.len() == n_genes && data.decoder_genes.iter().enumerate().all(|(k, &j)| k == j);
                let mut position = vec![u32::MAX; n_genes];
                for (k, &j) in data.input_genes.iter().enumerate() {
                    if position[j] != u32::MAX {
                        return invalid!("gene column {} is twice among the encoder's genes", j + 1);
                    }
                    position[j] = k as u32;
                }
                TrainingCells::Disk {
                    disk,
                    input_genes: data.input_genes,
                    position,
                    decoder_genes: (!all).then_some(data.decoder_genes),
                    scale: library.iter().map(|&l| config.input_scale_factor / l).collect(),
                }
            }
        };
        seed_torch(train_encoder.seed);
        let student = Student::new(config.clone(), device)?;
        // Each phase trains only its own side, with its own precision.
        train_encoder.bf16 = student.set_bf16_training(train_encoder.bf16);

        // Phase 1.
        let target = student.set_target(source, global);
        let enc_task = EncoderTask { student: &student, cells: &cells, target: &target, sample: Default::default() };
        let h1 = train(&enc_task, &train_encoder, interrupted, &|r| on_epoch(Phase::Encoder, r))?;
        drop(enc_task);

        // Phase 2, unless stopped: Z of every cell from the frozen encoder,
        // its batch norms first set to the statistics inference sees (the
        // running averages left Z about 0.87 times the teacher's scale on
        // CellBench, at a correlation of 0.998): of every cell in memory,
        // of 32,768 read in runs on disk.
        if !h1.interrupted && h1.diverged_at.is_none() {
            let every: Vec<usize> = (0..n).collect();
            match &cells {
                TrainingCells::Memory { input, .. } => student.recalibrate_encoder(input, &every),
                TrainingCells::Disk { .. } => {
                    let x = cells.read_input(&sample_in_runs(&every, 32_768))?;
                    student.recalibrate_encoder(&x, &(0..x.n_rows).collect::<Vec<_>>());
                }
            }
        }
        // Counts on disk and Z to a file: written there by the Z pass.
        let z_file = match (&cells, &z) {
            (TrainingCells::Disk { .. }, LatentOut::File(f)) => Some(f),
            _ => None,
        };
        // Z of every cell even after an interrupted encoder phase: the
        // model is returned with it.
        let z_pass = super::after_fit(h1.interrupted, interrupted);
        let (latent, log_library, log_factorial) = cells.latent_and_totals(&student, z_file, pass, z_pass)?;
        train_decoder.bf16 = student.set_bf16_training(train_decoder.bf16);
        let h2 = if h1.interrupted || h1.diverged_at.is_some() {
            History::default()
        } else {
            student.set_encoder_trainable(false);
            let task = DecoderTask {
                student: &student,
                z: &latent,
                cells: &cells,
                batch: &data.batch.codes,
                log_library: &log_library,
                log_factorial: &log_factorial,
            };
            let cfg2 = TrainConfig { seed: train_decoder.seed, ..train_decoder.clone() };
            let h = train(&task, &cfg2, interrupted, &|r| on_epoch(Phase::Decoder, r));
            student.set_encoder_trainable(true);
            h?
        };
        // The phase's windows and buffers are gone: now the caller's matrix.
        crate::device::release_free_memory();
        if let LatentStore::Held(latent) = latent {
            latent.write_to(&mut z)?;
        }
        let genes = data.counts.genes();
        let pick = |idx: &[usize]| idx.iter().map(|&j| genes[j].clone()).collect::<Vec<_>>();
        let meta = DistillMeta {
            config,
            input_genes: pick(data.input_genes),
            genes: pick(data.decoder_genes),
            batch_name: data.batch.name.clone(),
            batch_levels: data.batch.levels.clone(),
            train_encoder: train_encoder.clone(),
            train_decoder: train_decoder.clone(),
            history_encoder: h1.epochs,
            history_decoder: h2.epochs,
            best_epoch_encoder: h1.best_epoch,
            best_epoch_decoder: h2.best_epoch,
            stopped_early: [h1.stopped_early, h2.stopped_early],
            interrupted: h1.interrupted || h2.interrupted,
            diverged_at: h1
                .diverged_at
                .map(|e| ("encoder".to_string(), e))
                .or(h2.diverged_at.map(|e| ("decoder".to_string(), e))),
            n_cells: n,
            validation_cells: h1.validation_cells,
            teacher: data.teacher_name.clone(),
            teacher_protects: Some(data.teacher_protects.clone()),
            query_batches: vec![],
        };
        Ok(DistillModel { meta, student })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        io::model_to_bytes(&self.student.vs, "distill", &self.meta)
    }

    pub fn from_bytes(bytes: &[u8], device: Device) -> Result<DistillModel> {
        let (meta, tensors): (DistillMeta, _) = io::model_from_bytes(bytes, "distill", "a distilled one")?;
        io::check_meta("input genes", meta.input_genes.len(), meta.config.n_input)?;
        io::check_meta("genes", meta.genes.len(), meta.config.n_genes)?;
        io::check_meta("batches", meta.batch_levels.len(), meta.config.n_batch)?;
        let student = Student::new(meta.config.clone(), device)?;
        io::load_into(&student.vs, &tensors)?;
        Ok(DistillModel { meta, student })
    }

    /// Encoder input of new cells: the model's input genes, matched by
    /// name, log-normalized as in training (library over all their genes).
    pub fn input_for(&self, counts: &CountMatrix) -> Result<Csr> {
        let keep = counts.columns_of(&self.meta.input_genes, "input ")?;
        Ok(encoder_input(counts, &keep, self.meta.config.input_scale_factor))
    }

    /// Latent Z of every cell, row-major `[n, n_latent]`.
    pub fn latent(&self, counts: &CountMatrix) -> Result<Vec<f32>> {
        Ok(latent_of(&self.student, &self.input_for(counts)?))
    }

    /// Corrected expression ρ of every cell decoded as if from each batch of
    /// `reference` (averaged), row-major `[n, n_genes]`.
    pub fn corrected(&self, counts: &CountMatrix, reference: &[u32]) -> Result<Vec<f32>> {
        if reference.is_empty() {
            return invalid!("the reference batch must be one or more of the model's batches");
        }
        self.decoded(counts, &[], reference)
    }

    /// ρ of every cell, row-major `[n, n_genes]`: decoded under each cell's
    /// own batch `own` (one code per cell) when `reference` is empty, else
    /// as if from each batch of `reference`, averaged.
    pub fn decoded(&self, counts: &CountMatrix, own: &[u32], reference: &[u32]) -> Result<Vec<f32>> {
        let n = counts.n_cells();
        let n_batch = self.meta.batch_levels.len();
        if own.iter().chain(reference).any(|&b| b as usize >= n_batch) {
            return invalid!("the reference batch must be one or more of the model's batches");
        }
        if reference.is_empty() && own.len() != n {
            return invalid!("{} batch labels for {n} cells", own.len());
        }
        let z = self.latent(counts)?;
        let (s, d, g) = (&self.student, self.meta.config.n_latent, self.meta.config.n_genes);
        let mut out = Vec::with_capacity(n * g);
        tch::no_grad(|| {
            for start in (0..n).step_by(CHUNK) {
                let end = (start + CHUNK).min(n);
                let zt = Tensor::from_slice(&z[start * d..end * d])
                    .view([(end - start) as i64, d as i64])
                    .to_device(s.device());
                let acc = if reference.is_empty() {
                    let codes: Vec<i64> = own[start..end].iter().map(|&b| b as i64).collect();
                    s.decode_scale(&zt, &Tensor::from_slice(&codes).to_device(s.device()), false)
                } else {
                    let mut acc = Tensor::zeros([(end - start) as i64, g as i64], (Kind::Float, s.device()));
                    for &b in reference {
                        let batch = Tensor::full([(end - start) as i64], b as i64, (Kind::Int64, s.device()));
                        acc += s.decode_scale(&zt, &batch, false);
                    }
                    acc / reference.len() as f64
                };
                out.extend(Vec::<f32>::try_from(acc.to_device(Device::Cpu).flatten(0, -1)).unwrap_or_default());
            }
        });
        Ok(out)
    }
}

fn latent_of(s: &Student, input: &Csr) -> Vec<f32> {
    latent_rows(s, input, 0, input.n_rows)
}

/// Z of the rows `lo..hi` of `input`, row-major.
fn latent_rows(s: &Student, input: &Csr, lo: usize, hi: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity((hi - lo) * s.cfg.n_latent);
    tch::no_grad(|| {
        for start in (lo..hi).step_by(CHUNK) {
            let rows: Vec<usize> = (start..(start + CHUNK).min(hi)).collect();
            let x = crate::data::rows_to_tensor(input, &rows, s.device());
            out.extend(
                Vec::<f32>::try_from(s.encode(&x, false).to_device(Device::Cpu).flatten(0, -1)).unwrap_or_default(),
            );
        }
    });
    out
}

mod fitted;

#[cfg(test)]
#[path = "distill_tests.rs"]
pub(crate) mod tests;
