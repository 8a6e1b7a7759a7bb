//! The distilled student as a [`FittedModel`]. Its encoder is
//! deterministic (no posterior to draw from) and its decoder has no KL
//! term, so draws, ELBOs and posterior predictive samples are refused.

use super::{DecoderTask, DistillModel, Student, TrainingCells};
use crate::data::{CountMatrix, Rows};
use crate::de::{self, DeSettings, DeTable, StudentScales, Watch};
use crate::device::seed_torch;
use crate::error::{invalid, Result};
use crate::mapping::{new_levels, transplant, FrozenTask, MapOptions};
use crate::models::fitted::{
    codes_of, describe_meta, refuse, Cells, ExpressionOptions, FittedModel, Latent, LatentOptions, Matrix,
};
use crate::train::{default_max_epochs, train, EpochRecord, TrainConfig};
use serde_json::Value;
use std::any::Any;
use tch::Device;

impl DistillModel {
    /// The one count matrix of `cells`.
    fn counts_of(cells: &Cells) -> Result<&CountMatrix> {
        match cells.counts.as_slice() {
            [one] => Ok(one),
            other => invalid!("a distilled model reads one count matrix; got {}", other.len()),
        }
    }

    /// Batch codes of the cells' own batches: given, or the only batch.
    fn own_batches(&self, cells: &Cells) -> Result<Vec<u32>> {
        let levels = &self.meta.batch_levels;
        match &cells.batch {
            Some(b) => codes_of(b, levels, "`batch` value"),
            None if levels.len() == 1 => Ok(vec![0; cells.n_cells()]),
            None => invalid!(
                "the model was trained on {} batches: give the batch of each cell (`batch =`), or decode every \
                 cell to chosen batches with `transform_batch =`",
                levels.len()
            ),
        }
    }
}

impl DistillModel {
    /// The model mapped onto query cells whose batches are all new (see
    /// `crate::mapping`): the encoder is batch-free, so mapping adds rows to
    /// the decoder's batch embedding and trains only those (and, as an
    /// option, the decoder's first layer) on the query.
    pub fn map_query_cells(
        &self,
        cells: Cells,
        opts: &MapOptions,
        mut train_cfg: TrainConfig,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<DistillModel> {
        let counts = Self::counts_of(&cells)?;
        let Some(batch) = &cells.batch else {
            return invalid!(
                "give the batch of the query cells (`batch =`): each of their batches becomes a new batch of the model"
            );
        };
        let new = new_levels(&self.meta.batch_levels, batch, &self.meta.batch_name)?;
        let mut meta = self.meta.clone();
        meta.batch_levels.extend(new.iter().cloned());
        meta.query_batches.extend(new.iter().cloned());
        meta.config.n_batch += new.len();
        let codes = codes_of(batch, &meta.batch_levels, "`batch` value")?;
        let n = counts.n_cells();
        if train_cfg.max_epochs == 0 {
            train_cfg.max_epochs = default_max_epochs(n);
        }
        train_cfg.check()?;
        let input = self.input_for(counts)?;
        let keep = counts.columns_of(&self.meta.genes, "output ")?;
        seed_torch(train_cfg.seed);
        let student = Student::new(meta.config.clone(), self.device())?;
        train_cfg.bf16 = student.set_bf16_training(train_cfg.bf16);
        let first_layer = opts.train_decoder_first_layer;
        let frozen = transplant(&self.student.vs, &student.vs, &|_, old| (old, 0), &|name| {
            first_layer && name.starts_with("decoder.fc.layer0.linear.")
        })?;
        // Z and the totals as for the training cells.
        let cells = TrainingCells::Memory { input, counts: counts.csr.select_columns(&keep) };
        let (z, log_library, log_factorial) = cells.latent_and_totals(&student, None, &|_, _| {}, interrupted)?;
        let task = DecoderTask {
            student: &student,
            z: &z,
            cells: &cells,
            batch: &codes,
            log_library: &log_library,
            log_factorial: &log_factorial,
        };
        let h = train(&FrozenTask { inner: &task, frozen: &frozen }, &train_cfg, interrupted, on_epoch)?;
        meta.train_decoder = train_cfg;
        meta.history_decoder = h.epochs;
        meta.best_epoch_decoder = h.best_epoch;
        meta.stopped_early[1] = h.stopped_early;
        meta.interrupted = h.interrupted;
        meta.diverged_at = h.diverged_at.map(|e| ("decoder".to_string(), e));
        meta.n_cells = n;
        meta.validation_cells = h.validation_cells;
        Ok(DistillModel { meta, student })
    }
}

impl FittedModel for DistillModel {
    fn kind(&self) -> &'static str {
        "distill"
    }

    fn device(&self) -> Device {
        self.student.device()
    }

    fn describe(&self) -> Result<Value> {
        describe_meta(self.kind(), self.device(), &self.meta)
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        DistillModel::to_bytes(self)
    }

    fn latent(&self, cells: Cells, opts: &LatentOptions) -> Result<Latent> {
        refuse(
            !opts.give_mean,
            "give_mean = FALSE",
            "a distilled model's encoder is deterministic; there is no posterior to draw from",
        )?;
        let counts = Self::counts_of(&cells)?;
        let z = DistillModel::latent(self, counts)?;
        Ok(Latent { joint: Matrix::new(counts.n_cells(), self.meta.config.n_latent, z), parts: vec![] })
    }

    fn expression(&self, cells: Cells, opts: &ExpressionOptions) -> Result<Matrix> {
        refuse(opts.modality != 0, "modality", "a distilled model decodes one modality")?;
        refuse(opts.ambient, "ambient", "a distilled model has no ambient term")?;
        refuse(
            opts.n_samples > 1,
            "n_samples",
            "a distilled model's encoder and decoder are deterministic; there is nothing to average over",
        )?;
        let counts = Self::counts_of(&cells)?;
        let rho = if opts.transform_batch.is_empty() {
            self.decoded(counts, &self.own_batches(&cells)?, &[])?
        } else {
            let refs = codes_of(&opts.transform_batch, &self.meta.batch_levels, "`transform_batch`")?;
            self.decoded(counts, &[], &refs)?
        };
        let values = rho.into_iter().map(|v| (v as f64 * opts.library_size) as f32).collect();
        Ok(Matrix::new(counts.n_cells(), self.meta.config.n_genes, values))
    }

    fn differential_expression(
        &self,
        cells: Cells,
        group1: &[usize],
        group2: &[usize],
        mut settings: DeSettings,
        batches: &[String],
        watch: &Watch,
    ) -> Result<DeTable> {
        settings.batches = codes_of(batches, &self.meta.batch_levels, "batch")?;
        let own = self.own_batches(&cells)?;
        let counts = Self::counts_of(&cells)?;
        seed_torch(settings.seed);
        let input = self.input_for(counts)?;
        let keep = counts.columns_of(&self.meta.genes, "output ")?;
        let out = counts.csr.select_columns(&keep);
        let scales = StudentScales { student: &self.student, input: &input, batch: &own };
        de::differential_expression(&scales, Rows::Memory(&out), group1, group2, &settings, watch)
    }

    fn map_query(
        &self,
        cells: Cells,
        opts: &MapOptions,
        train: TrainConfig,
        interrupted: &dyn Fn() -> bool,
        on_epoch: &dyn Fn(&EpochRecord),
    ) -> Result<Box<dyn FittedModel>> {
        Ok(Box::new(self.map_query_cells(cells, opts, train, interrupted, on_epoch)?))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
