//! The cross-species model as a [`FittedModel`]: latents and expression of
//! either species' cells (`species = "context"` or `"target"`).

use super::align::encode_all;
use super::{Side, SpeciesModel};
use crate::data::{Categorical, Covariates, Csr};
use crate::error::{invalid, Result};
use crate::models::fitted::{
    codes_of, describe_meta, refuse, Cells, ExpressionOptions, FittedModel, Latent, LatentOptions, Matrix,
};
use crate::models::vae::VaeData;
use crate::nn::Pass;
use serde_json::Value;
use std::any::Any;
use tch::{Device, Kind, Tensor};

/// Which species a call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Species {
    Context,
    Target,
}

impl Species {
    pub fn parse(s: &str) -> Result<Species> {
        match s {
            "context" => Ok(Species::Context),
            "target" => Ok(Species::Target),
            "" => invalid!("say which species the cells are of: `species = \"context\"` or `\"target\"`"),
            other => invalid!("`species` must be \"context\" or \"target\", not '{other}'"),
        }
    }
}

impl SpeciesModel {
    fn side(&self, s: Species) -> &Side {
        match s {
            Species::Context => &self.context,
            Species::Target => &self.target,
        }
    }

    /// The counts of `cells` in the species' gene order and their batch.
    pub fn prepare(&self, s: Species, cells: Cells) -> Result<(Csr, Covariates)> {
        let n = cells.n_cells();
        let Cells { mut counts, batch, .. } = cells;
        if counts.len() != 1 {
            return invalid!("a cross-species model reads one count matrix per species; got {}", counts.len());
        }
        let (genes, levels, what) = match s {
            Species::Context => (&self.meta.context_genes, &self.meta.context_batch_levels, "context"),
            Species::Target => (&self.meta.target_genes, &self.meta.target_batch_levels, "target"),
        };
        let m = counts.remove(0);
        let keep = m.columns_of(genes, &format!(" of the {what} species"))?;
        let csr = m.into_columns(&keep);
        let codes = match batch {
            Some(labels) => codes_of(&labels, levels, &format!("{what} batch"))?,
            None if levels.len() == 1 => vec![0; n],
            None => {
                return invalid!(
                    "the model's {what} species has {} batches: give the batch of the new cells (`batch =`)",
                    levels.len()
                )
            }
        };
        let batch = Categorical::new("batch", codes, levels.clone(), n, 0)?;
        Ok((csr, Covariates::new(batch, vec![], vec![])?))
    }

    /// Posterior means of z of the training cells of species `s` (`counts`
    /// and `batch` as fitted): no gene matching, no copy of the counts.
    pub fn training_latent(&self, s: Species, counts: &Csr, batch: &Categorical) -> Result<Matrix> {
        let cov = Covariates::new(batch.clone(), vec![], vec![])?;
        let reps =
            encode_all(self.side(s), self.inner_of(s), &VaeData::for_encoding(counts, &cov), self.device(), false);
        let values: Vec<f32> = Vec::try_from(reps.mean.to_device(Device::Cpu).flatten(0, -1))?;
        Ok(Matrix::new(counts.n_rows, self.meta.config.n_latent, values))
    }

    fn inner_of(&self, s: Species) -> &crate::nn::GaussianEncoder {
        match s {
            Species::Context => self.context.inner.as_ref().expect("the context has an inner encoder"),
            Species::Target => self.target_inner(),
        }
    }
}

impl FittedModel for SpeciesModel {
    fn kind(&self) -> &'static str {
        "species"
    }

    fn device(&self) -> Device {
        self.context_vs.device()
    }

    /// The description without the per-cell vectors of the context (which
    /// the file keeps for the analyses).
    fn describe(&self) -> Result<Value> {
        let mut v = describe_meta(self.kind(), self.device(), &self.meta)?;
        if let Value::Object(map) = &mut v {
            for key in ["context_labels", "context_batches", "context_cells"] {
                map.remove(key);
            }
            map.insert("n_context_cells".into(), Value::from(self.meta.context_cells.len()));
            map.insert("n_target_cells".into(), Value::from(self.meta.target_training.n_cells));
        }
        Ok(v)
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        SpeciesModel::to_bytes(self)
    }

    fn latent(&self, cells: Cells, opts: &LatentOptions) -> Result<Latent> {
        let s = Species::parse(&opts.species)?;
        let (csr, cov) = self.prepare(s, cells)?;
        let data = VaeData::for_encoding(&csr, &cov);
        let reps = encode_all(self.side(s), self.inner_of(s), &data, self.device(), false);
        let z = if opts.give_mean {
            reps.mean
        } else {
            crate::device::seed_torch(opts.seed);
            &reps.mean + reps.var.sqrt() * reps.mean.randn_like()
        };
        let d = self.meta.config.n_latent;
        let values: Vec<f32> = Vec::try_from(z.to_device(Device::Cpu).flatten(0, -1))?;
        Ok(Latent { joint: Matrix::new(csr.n_rows, d, values), parts: vec![] })
    }

    /// Expected expression ρ · `library_size` of each cell at its posterior
    /// mean, decoded under its own batch or averaged over `transform_batch`.
    fn expression(&self, cells: Cells, opts: &ExpressionOptions) -> Result<Matrix> {
        let s = Species::parse(&opts.species)?;
        refuse(opts.n_samples != 1, "n_samples", "cross-species models decode the posterior mean")?;
        refuse(opts.modality != 0, "modality", "a cross-species model has one modality per species")?;
        refuse(opts.ambient, "ambient", "a cross-species model has no ambient background")?;
        let (csr, cov) = self.prepare(s, cells)?;
        let levels = match s {
            Species::Context => &self.meta.context_batch_levels,
            Species::Target => &self.meta.target_batch_levels,
        };
        let transform = codes_of(&opts.transform_batch, levels, "`transform_batch`")?;
        let side = self.side(s);
        let data = VaeData::for_encoding(&csr, &cov);
        let reps = encode_all(side, self.inner_of(s), &data, self.device(), false);
        let n = csr.n_rows;
        let device = self.device();
        let rho = tch::no_grad(|| {
            let decode = |batch: &Tensor| {
                let design = batch.one_hot(side.shape.n_batch as i64).to_kind(Kind::Float);
                side.decoder.heads(&reps.mean, &design, batch, Pass::Eval).logits.softmax(-1, Kind::Float)
            };
            if transform.is_empty() {
                decode(&cov.batch_codes(&(0..n).collect::<Vec<_>>(), None, device))
            } else {
                let sum = transform
                    .iter()
                    .map(|&b| decode(&Tensor::full([n as i64], b as i64, (Kind::Int64, device))))
                    .fold(None, |acc: Option<Tensor>, r| Some(acc.map_or(r.shallow_clone(), |a| a + r)))
                    .expect("one batch at least");
                sum / transform.len() as f64
            }
        }) * opts.library_size;
        let values: Vec<f32> = Vec::try_from(rho.to_device(Device::Cpu).flatten(0, -1))?;
        Ok(Matrix::new(n, side.shape.n_genes, values))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
