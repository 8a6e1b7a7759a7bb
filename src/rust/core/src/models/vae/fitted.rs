//! The VAE as a [`FittedModel`].

use super::{infer, VaeData, VaeModel, VaeTask};
use crate::data::{columns_of, Covariates, Csr, DiskCells, DiskCsr, Scan};
use crate::de::{self, DeSettings, DeTable, VaeScales, Watch};
use crate::device::seed_torch;
use crate::error::{invalid, Result};
use crate::mapping::MapOptions;
use crate::models::fitted::{
    after_fit, codes_of, describe_meta, refuse, Cells, Elbo, ExpressionOptions, FittedModel, Latent, LatentOptions,
    LatentOut, Matrix,
};
use crate::train::{EpochRecord, TrainConfig};
use serde_json::Value;
use std::any::Any;
use tch::Device;

impl VaeModel {
    /// Posterior means of the training cells (`counts` and `cov` as fitted).
    pub fn training_latent(&self, counts: &Csr, cov: &Covariates) -> Matrix {
        Matrix::new(
            counts.n_rows,
            self.meta.config.n_latent,
            infer::latent(&self.vae, &VaeData::for_encoding(counts, cov), true),
        )
    }

    /// `training_latent` of the training cells of `data` (in memory or on
    /// disk, as fitted) into `out`, in order, a minibatch at a time:
    /// never all cells in single precision beside `out`.
    /// `progress(done, all)` as the cells are encoded; after a fit that an
    /// interrupt ended, that interrupt does not stop it ([`after_fit`]).
    pub fn training_latent_into(
        &self,
        data: &VaeData,
        progress: &dyn Fn(usize, usize),
        interrupted: &dyn Fn() -> bool,
        out: &mut LatentOut,
    ) -> Result<()> {
        let (n, d) = (data.n_cells(), self.meta.config.n_latent);
        if out.len() != n * d {
            return invalid!("room for {} latent values; expected cells ({n}) × dimensions ({d})", out.len());
        }
        let mut cells = out.in_order(d);
        let interrupted = after_fit(self.meta.training.interrupted, interrupted);
        infer::latent_each(&self.vae, data, true, progress, interrupted, &mut |first, z| cells.push(first, z))?;
        cells.finish()
    }

    /// Latent coordinates of cells on disk, read in blocks;
    /// `progress(done, all)` as they are read.
    pub fn latent_on_disk(
        &self,
        cells: DiskCells,
        give_mean: bool,
        seed: u64,
        progress: &dyn Fn(usize, usize),
        interrupted: &dyn Fn() -> bool,
    ) -> Result<Matrix> {
        let (disk, cov) = self.prepare_on_disk(cells, true)?;
        let n = disk.n_rows();
        let data = VaeData::on_disk(&disk, &unscanned(n), &cov);
        seed_torch(seed);
        let z = infer::latent_watched(&self.vae, &data, give_mean, progress, interrupted)?;
        Ok(Matrix::new(n, self.meta.config.n_latent, z))
    }

    /// Bayesian DE between the cells `group1` and `group2` (0-based) of a
    /// matrix on disk, as `differential_expression()` of cells in memory
    /// (the same table for the same cells and seed): the groups' cells are
    /// read a chunk at a time, never all at once.
    pub fn differential_expression_on_disk(
        &self,
        cells: DiskCells,
        group1: &[usize],
        group2: &[usize],
        mut settings: DeSettings,
        batches: &[String],
        watch: &Watch,
    ) -> Result<DeTable> {
        settings.batches = codes_of(batches, &self.meta.batch_levels, "batch")?;
        let (disk, cov) = self.prepare_on_disk(cells, false)?;
        let n = disk.n_rows();
        if let Some(&bad) = group1.iter().chain(group2).find(|&&c| c >= n) {
            return crate::error::invalid!("cell {} of a group is outside the {n} cells on disk", bad + 1);
        }
        self.de_of(&VaeData::on_disk(&disk, &unscanned(n), &cov), group1, group2, &settings, watch)
    }

    /// DE of cells `group1` and `group2` of `data`, in memory or on disk,
    /// seeded by the settings.
    fn de_of(
        &self,
        data: &VaeData,
        group1: &[usize],
        group2: &[usize],
        settings: &DeSettings,
        watch: &Watch,
    ) -> Result<DeTable> {
        seed_torch(settings.seed);
        let scales = VaeScales { model: &self.vae, data };
        de::differential_expression(&scales, data.counts, group1, group2, settings, watch)
    }

    /// `prepare` of cells on disk: the matrix with the model's genes, in
    /// its order, and the covariates.
    fn prepare_on_disk(&self, cells: DiskCells, encoder_only: bool) -> Result<(DiskCsr, Covariates)> {
        let DiskCells { disk, genes, batch, categorical, continuous } = cells;
        let disk = disk.select_columns(columns_of(&genes, &self.meta.genes, "")?)?;
        let n = disk.n_rows();
        let cov = if encoder_only && !self.meta.config.encode_covariates {
            self.neutral_covariates(n)
        } else {
            let cats = self.given_categorical(categorical)?;
            self.covariates_for(n, batch.as_deref(), &cats, continuous, true)?
        };
        Ok((disk, cov))
    }

    /// The counts of `cells` in the model's gene order, with their
    /// covariates. Covariates the computation does not read (the encoder of
    /// a model that does not encode them) may be left out.
    pub(crate) fn prepare(&self, cells: Cells, encoder_only: bool) -> Result<(Csr, Covariates)> {
        let n = cells.n_cells();
        let Cells { mut counts, batch, categorical, continuous } = cells;
        if counts.len() != 1 {
            return crate::error::invalid!("a VAE reads one count matrix; got {}", counts.len());
        }
        let csr = self.align_genes(counts.remove(0))?;
        let cov = if encoder_only && !self.meta.config.encode_covariates {
            self.neutral_covariates(n)
        } else {
            let cats = self.given_categorical(categorical)?;
            self.covariates_for(n, batch.as_deref(), &cats, continuous, true)?
        };
        Ok((csr, cov))
    }
}

/// Per-cell totals left unread, for work that needs neither the library
/// sizes nor the likelihood's constant: the encoder reads log(1 + x) and
/// the covariates, and decoded proportions ρ do not depend on the library
/// (a pass over the file to sum the cells would be wasted).
fn unscanned(n: usize) -> Scan {
    Scan { row_sums: vec![1.0; n], log_factorial: vec![0.0; n], ..Default::default() }
}

impl FittedModel for VaeModel {
    fn kind(&self) -> &'static str {
        "vae"
    }

    fn device(&self) -> Device {
        self.vae.device()
    }

    fn describe(&self) -> Result<Value> {
        describe_meta(self.kind(), self.device(), &self.meta)
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        VaeModel::to_bytes(self)
    }

    fn latent(&self, cells: Cells, opts: &LatentOptions) -> Result<Latent> {
        let (csr, cov) = self.prepare(cells, true)?;
        seed_torch(opts.seed);
        let z = infer::latent(&self.vae, &VaeData::for_encoding(&csr, &cov), opts.give_mean);
        Ok(Latent { joint: Matrix::new(csr.n_rows, self.meta.config.n_latent, z), parts: vec![] })
    }

    fn expression(&self, cells: Cells, opts: &ExpressionOptions) -> Result<Matrix> {
        refuse(opts.modality != 0, "modality", "a VAE models one modality")?;
        refuse(opts.ambient, "ambient", "a VAE has no ambient term (see fit_vae(regularized = TRUE))")?;
        let targets = codes_of(&opts.transform_batch, &self.meta.batch_levels, "`transform_batch`")?;
        let (csr, cov) = self.prepare(cells, false)?;
        seed_torch(opts.seed);
        let data = VaeData::for_encoding(&csr, &cov);
        let x = infer::expression(&self.vae, &data, &targets, opts.library_size, opts.n_samples.max(1));
        Ok(Matrix::new(csr.n_rows, self.meta.config.n_genes, x))
    }

    fn elbo(&self, cells: Cells, seed: u64) -> Result<Elbo> {
        let (csr, cov) = self.prepare(cells, false)?;
        seed_torch(seed);
        let data = VaeData::new(&csr, &cov);
        let rows: Vec<usize> = (0..csr.n_rows).collect();
        let (elbo, reconstruction, kl) =
            crate::train::evaluate(&VaeTask { model: &self.vae, data: &data }, &rows, 1024);
        Ok(Elbo { elbo, reconstruction, kl })
    }

    fn sample_counts(&self, cells: Cells, n_samples: usize, seed: u64) -> Result<Vec<Csr>> {
        let (csr, cov) = self.prepare(cells, false)?;
        seed_torch(seed);
        let data = VaeData::for_encoding(&csr, &cov);
        Ok((0..n_samples.max(1)).map(|_| infer::sample_counts(&self.vae, &data)).collect())
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
        let (csr, cov) = self.prepare(cells, false)?;
        self.de_of(&VaeData::new(&csr, &cov), group1, group2, &settings, watch)
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
