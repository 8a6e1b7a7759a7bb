//! The distilled student as a [`FittedModel`]. Its encoder is
//! deterministic (no posterior to draw from) and its decoder has no KL
//! term, so draws, ELBOs and posterior predictive samples are refused.

use super::DistillModel;
use crate::data::CountMatrix;
use crate::de::{self, DeSettings, DeTable, StudentScales};
use crate::device::seed_torch;
use crate::error::{invalid, Result};
use crate::models::fitted::{
    codes_of, describe_meta, refuse, Cells, ExpressionOptions, FittedModel, Latent, LatentOptions, Matrix,
};
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
        interrupted: &dyn Fn() -> bool,
    ) -> Result<DeTable> {
        settings.batches = codes_of(batches, &self.meta.batch_levels, "batch")?;
        let own = self.own_batches(&cells)?;
        let counts = Self::counts_of(&cells)?;
        seed_torch(settings.seed);
        let input = self.input_for(counts)?;
        let keep = counts.columns_of(&self.meta.genes, "output ")?;
        let out = counts.csr.select_columns(&keep);
        let scales = StudentScales { student: &self.student, input: &input, batch: &own };
        de::differential_expression(&scales, &out, group1, group2, &settings, interrupted)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
