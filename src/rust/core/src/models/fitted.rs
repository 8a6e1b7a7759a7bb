//! The one shape of every fitted model: what the glue and R see, whatever
//! the model. A new model implements [`FittedModel`] and registers its kind
//! in [`from_bytes`]; nothing else in the glue or in R dispatches on kinds.

use crate::data::{CellsH5, CountMatrix, Csr};
use crate::de::{DeSettings, DeTable, Watch};
use crate::error::{invalid, Error, Result};
use crate::mapping::MapOptions;
use crate::train::{EpochRecord, TrainConfig};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::any::Any;
use tch::Device;

/// Cells handed to a fitted model: their counts (one matrix per modality,
/// in the model's modality order; genes are matched by name) and their
/// covariate labels.
#[derive(Debug, Default)]
pub struct Cells {
    pub counts: Vec<CountMatrix>,
    /// Batch label of each cell; `None` when not given (allowed where the
    /// model has one batch or the computation does not use it).
    pub batch: Option<Vec<String>>,
    /// Further categorical covariates in the model's order (for a
    /// multimodal model: its covariate keys); `None` where not given.
    pub categorical: Vec<Option<Vec<String>>>,
    /// Continuous covariates in the model's order.
    pub continuous: Vec<Vec<f32>>,
}

impl Cells {
    pub fn n_cells(&self) -> usize {
        self.counts.first().map_or(0, CountMatrix::n_cells)
    }
}

/// Where a fit puts the latent space of its training cells: a cells × d
/// column-major matrix of the caller's (R's, filled in place), or the cells
/// of an HDF5 dataset (stored as f32, the encoder's precision), so that it
/// is never all in memory.
pub enum LatentOut<'a> {
    Memory(&'a mut [f64]),
    File(CellsH5),
}

impl<'a> LatentOut<'a> {
    /// Values it has room for.
    pub fn len(&self) -> usize {
        match self {
            LatentOut::Memory(z) => z.len(),
            LatentOut::File(f) => f.n * f.d,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row-major `rows` (whole cells of `d` values) as cells `first..`.
    pub fn write_rows(&mut self, d: usize, first: usize, rows: &[f32]) -> Result<()> {
        match self {
            LatentOut::Memory(z) => {
                let n = z.len() / d.max(1);
                for (i, row) in rows.chunks(d).enumerate() {
                    row.iter().enumerate().for_each(|(j, &v)| z[j * n + first + i] = f64::from(v));
                }
                Ok(())
            }
            LatentOut::File(f) => f.write(first, &rows.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()),
        }
    }

    /// A writer of cells of `d` values handed in order, for passes that
    /// give them a minibatch or a block at a time (see [`InOrder`]).
    pub fn in_order(&mut self, d: usize) -> InOrder<'_, 'a> {
        InOrder { out: self, d, held: Vec::new(), at: 0 }
    }
}

/// Cells written into a [`LatentOut`] in the order they are handed over.
/// Into memory each part is written at once; into a file they are gathered
/// and written `IN_ORDER_CELLS` at a time, since every write opens the file
/// (a minibatch of 1,024 cells a write made 5,000 opens at 5·10^6 cells).
/// Call [`InOrder::finish`] for the last of them.
pub struct InOrder<'o, 'a> {
    out: &'o mut LatentOut<'a>,
    d: usize,
    held: Vec<f32>,
    at: usize,
}

/// Cells per write of [`InOrder`] into a file (13 MB at 50 dimensions).
const IN_ORDER_CELLS: usize = 1 << 16;

impl InOrder<'_, '_> {
    /// `rows` (row-major, whole cells) as cells `first..`, which follow
    /// those handed before.
    pub fn push(&mut self, first: usize, rows: &[f32]) -> Result<()> {
        if let LatentOut::Memory(_) = self.out {
            return self.out.write_rows(self.d, first, rows);
        }
        if self.held.is_empty() {
            self.at = first;
        }
        debug_assert_eq!(first, self.at + self.held.len() / self.d.max(1), "cells handed out of order");
        self.held.extend_from_slice(rows);
        if self.held.len() >= IN_ORDER_CELLS * self.d {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.held.is_empty() {
            self.out.write_rows(self.d, self.at, &self.held)?;
            self.held.clear();
        }
        Ok(())
    }

    /// Writes what is still gathered.
    pub fn finish(mut self) -> Result<()> {
        self.flush()
    }
}

/// What stops the pass that encodes the training cells after a fit. A fit
/// that an interrupt ended still returns its model, and the interrupt stays
/// raised: that pass then runs to its end, or the model would be lost with
/// it.
pub fn after_fit(fit_interrupted: bool, interrupted: &dyn Fn() -> bool) -> &dyn Fn() -> bool {
    if fit_interrupted {
        &|| false
    } else {
        interrupted
    }
}

/// A row-major matrix of results, `rows × cols`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, values: Vec<f32>) -> Matrix {
        debug_assert_eq!(values.len(), rows * cols);
        Matrix { rows, cols, values }
    }
}

/// Options of [`FittedModel::latent`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatentOptions {
    /// The posterior mean, or one draw from q(z | x).
    pub give_mean: bool,
    /// Seed of the draws.
    pub seed: u64,
    /// For a model of several species: "context" or "target".
    pub species: String,
}

impl Default for LatentOptions {
    fn default() -> Self {
        LatentOptions { give_mean: true, seed: 0, species: String::new() }
    }
}

/// A model's latent space of some cells: the joint one, and for a model of
/// several modalities each modality's own (named).
#[derive(Debug, Clone)]
pub struct Latent {
    pub joint: Matrix,
    pub parts: Vec<(String, Matrix)>,
}

/// Options of [`FittedModel::expression`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExpressionOptions {
    /// Batches every cell is decoded under, averaged; empty: each cell's own.
    #[serde(deserialize_with = "one_or_many")]
    pub transform_batch: Vec<String>,
    /// Scale of the output (1: proportions).
    pub library_size: f64,
    /// Draws of z averaged (1: the posterior mean).
    pub n_samples: usize,
    pub seed: u64,
    /// Modality decoded (0-based), for models of several modalities.
    pub modality: usize,
    /// Include the ambient background, for models that have one.
    pub ambient: bool,
    /// For a model of several species: "context" or "target".
    pub species: String,
}

impl Default for ExpressionOptions {
    fn default() -> Self {
        ExpressionOptions {
            transform_batch: vec![],
            library_size: 1.0,
            n_samples: 1,
            seed: 0,
            modality: 0,
            ambient: false,
            species: String::new(),
        }
    }
}

/// Mean negative ELBO, reconstruction and KL per cell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Elbo {
    pub elbo: f64,
    pub reconstruction: f64,
    pub kl: f64,
}

/// A string, or a sequence of strings (R's length-one vectors arrive as scalars).
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
        None(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
        OneOrMany::None(()) => vec![],
    })
}

/// What every fitted model offers. Operations a model does not have answer
/// with an error that says so (never a silently different computation).
pub trait FittedModel: Send {
    /// The kind stored in model files: "vae", "distill", "multimodal".
    fn kind(&self) -> &'static str;
    fn device(&self) -> Device;
    /// The model's description (architecture, features, covariate levels,
    /// training record) as stored in its file, plus `kind` and `device`.
    fn describe(&self) -> Result<Value>;
    /// The model file's bytes.
    fn to_bytes(&self) -> Result<Vec<u8>>;
    /// Latent coordinates of `cells`.
    fn latent(&self, cells: Cells, opts: &LatentOptions) -> Result<Latent>;
    /// Expected expression (features × ... per cell) of `cells`, row-major
    /// `[cells, features]`.
    fn expression(&self, cells: Cells, opts: &ExpressionOptions) -> Result<Matrix>;
    /// Negative ELBO of `cells`, one draw of z per cell.
    fn elbo(&self, _cells: Cells, _seed: u64) -> Result<Elbo> {
        unavailable(self.kind(), "elbo()")
    }
    /// `n_samples` draws of counts from the posterior predictive.
    fn sample_counts(&self, _cells: Cells, _n_samples: usize, _seed: u64) -> Result<Vec<Csr>> {
        unavailable(self.kind(), "sample_counts()")
    }
    /// Bayesian DE between the cells `group1` and `group2` (0-based) of
    /// `cells`; `batches`: labels every cell is decoded under (empty: own).
    fn differential_expression(
        &self,
        _cells: Cells,
        _group1: &[usize],
        _group2: &[usize],
        _settings: DeSettings,
        _batches: &[String],
        _watch: &Watch,
    ) -> Result<DeTable> {
        unavailable(self.kind(), "Bayesian differential_expression()")
    }
    /// The model mapped onto the query `cells` (scArches surgery): their new
    /// batch levels added, trained on them with everything else frozen.
    fn map_query(
        &self,
        _cells: Cells,
        _opts: &MapOptions,
        _train: TrainConfig,
        _interrupted: &dyn Fn() -> bool,
        _on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<Box<dyn FittedModel>> {
        unavailable(self.kind(), "map_query()")
    }
    /// For operations of one kind only (downcast by the caller).
    fn as_any(&self) -> &dyn Any;
}

fn unavailable<T>(kind: &str, what: &str) -> Result<T> {
    invalid!("{what} is not available for {} models", kind_name(kind))
}

/// The kind as users know it.
pub fn kind_name(kind: &str) -> &str {
    match kind {
        "vae" => "VAE",
        "distill" => "distilled",
        "multimodal" => "multimodal",
        "species" => "cross-species",
        other => other,
    }
}

/// Reads any model file onto `device`: the one place that knows every kind.
pub fn from_bytes(bytes: &[u8], device: Device) -> Result<Box<dyn FittedModel>> {
    let kind = crate::io::kind_of(bytes)?;
    Ok(match kind.as_str() {
        "vae" => Box::new(super::vae::VaeModel::from_bytes(bytes, device)?),
        "distill" => Box::new(super::distill::DistillModel::from_bytes(bytes, device)?),
        "multimodal" => Box::new(super::multimodal::MultimodalModel::from_bytes(bytes, device)?),
        "species" => Box::new(super::species::SpeciesModel::from_bytes(bytes, device)?),
        other => return invalid!("the model file holds a model of kind '{other}', which this scdistill does not know"),
    })
}

/// `meta` as JSON with the model's kind and device added.
pub fn describe_meta<T: serde::Serialize>(kind: &str, device: Device, meta: &T) -> Result<Value> {
    let mut v = serde_json::to_value(meta).map_err(|e| Error::InvalidInput(e.to_string()))?;
    if let Value::Object(map) = &mut v {
        map.insert("kind".into(), Value::from(kind));
        map.insert("device".into(), Value::from(crate::device::device_name(device)));
    }
    Ok(v)
}

/// Codes of `labels` among `levels`; an unknown label is an error naming
/// it, the argument `what` and the levels.
pub fn codes_of(labels: &[String], levels: &[String], what: &str) -> Result<Vec<u32>> {
    labels
        .iter()
        .map(|l| match levels.iter().position(|v| v == l) {
            Some(p) => Ok(p as u32),
            None => invalid!("{what} '{l}' is not a batch of the model (batches: {})", levels_list(levels)),
        })
        .collect()
}

/// Refuses an option the model cannot honour, naming it and why.
pub fn refuse(given: bool, option: &str, why: &str) -> Result<()> {
    if given {
        return invalid!("`{option}` does not apply here: {why}");
    }
    Ok(())
}

/// Levels quoted and joined, the first 20.
pub fn levels_list(levels: &[String]) -> String {
    let mut s = levels.iter().take(20).map(|l| format!("'{l}'")).collect::<Vec<_>>().join(", ");
    if levels.len() > 20 {
        s.push_str(&format!(", ... ({} in all)", levels.len()));
    }
    s
}
