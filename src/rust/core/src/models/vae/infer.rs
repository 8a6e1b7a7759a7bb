//! Batched inference without gradients: latent representation, normalized
//! and counterfactual expression, posterior predictive counts.

use super::{Likelihood, Vae, VaeData};
use crate::data::Csr;
use crate::error::Result;
use tch::{Kind, Tensor};

/// Cells per inference minibatch.
const CHUNK: usize = 1024;

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(tch::Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default()
}

/// Latent coordinates of every cell of `data`, row-major `[n_cells, n_latent]`:
/// the posterior mean, or one draw from q(z | x).
pub fn latent(model: &Vae, data: &VaeData, give_mean: bool) -> Vec<f32> {
    latent_watched(model, data, give_mean, &|_, _| {}, &|| false).expect("not interrupted")
}

/// `latent`, calling `progress(cells done, all cells)` after each part of
/// about 16,000 cells and stopping with an error when `interrupted()`: the
/// pass over 10^6 cells on disk takes minutes.
pub fn latent_watched(
    model: &Vae,
    data: &VaeData,
    give_mean: bool,
    progress: &dyn Fn(usize, usize),
    interrupted: &dyn Fn() -> bool,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(data.n_cells() * model.cfg.n_latent);
    latent_each(model, data, give_mean, progress, interrupted, &mut |_, z| {
        out.extend_from_slice(z);
        Ok(())
    })?;
    Ok(out)
}

/// `latent_watched`, each minibatch's rows handed to `emit(first cell,
/// row-major values)` in the cells' order instead of gathered.
pub fn latent_each(
    model: &Vae,
    data: &VaeData,
    give_mean: bool,
    progress: &dyn Fn(usize, usize),
    interrupted: &dyn Fn() -> bool,
    emit: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let n = data.n_cells();
    let watch = crate::de::Watch::new(interrupted, progress);
    watch.expect(n);
    tch::no_grad(|| -> Result<()> {
        for start in (0..n).step_by(CHUNK) {
            watch.check()?;
            let rows: Vec<usize> = (start..(start + CHUNK).min(n)).collect();
            let ((qm, qv), _) = model.encode(&data.inputs(&rows, None, model.device()), false);
            let z = if give_mean { qm } else { &qm + qv.sqrt() * qm.randn_like() };
            emit(start, &to_vec(&z))?;
            watch.advance(rows.len());
        }
        Ok(())
    })
}

/// Expected expression ρ · `library_size` of every cell, row-major
/// `[n_cells, n_genes]`, decoded as if each cell came from each batch in
/// `transform_batch` (its own batch when empty) and averaged over those
/// batches and over `n_samples` draws of z (the posterior mean when 1).
pub fn expression(
    model: &Vae,
    data: &VaeData,
    transform_batch: &[u32],
    library_size: f64,
    n_samples: usize,
) -> Vec<f32> {
    let n = data.n_cells();
    let g = model.cfg.n_genes;
    let batches: Vec<Option<u32>> =
        if transform_batch.is_empty() { vec![None] } else { transform_batch.iter().map(|&b| Some(b)).collect() };
    let n_draws = n_samples.max(1);
    let mut out = Vec::with_capacity(n * g);
    tch::no_grad(|| {
        for start in (0..n).step_by(CHUNK) {
            let rows: Vec<usize> = (start..(start + CHUNK).min(n)).collect();
            let own = data.inputs(&rows, None, model.device());
            let ((qm, qv), _) = model.encode(&own, false);
            let mut acc = Tensor::zeros([rows.len() as i64, g as i64], (Kind::Float, model.device()));
            for _ in 0..n_draws {
                let z = if n_draws == 1 { qm.shallow_clone() } else { &qm + qv.sqrt() * qm.randn_like() };
                for &b in &batches {
                    let design = data.covariates.design(&rows, b, model.device());
                    let batch = data.covariates.batch_codes(&rows, b, model.device());
                    let d = model.decode(&z, &own.log_library, &design, &batch, false);
                    acc += d.scale;
                }
            }
            acc *= library_size / (n_draws * batches.len()) as f64;
            out.extend(to_vec(&acc));
        }
    });
    out
}

/// Draws counts from the posterior predictive p(x̃ | x): z ~ q(z | x), the
/// library observed (or drawn from q(l | x)), then the observation model
/// (NB as a Gamma–Poisson mixture). Returned as CSR, cells × genes.
pub fn sample_counts(model: &Vae, data: &VaeData) -> Csr {
    let n = data.n_cells();
    let mut rows_out: Vec<(Vec<u32>, Vec<f32>)> = Vec::with_capacity(n);
    tch::no_grad(|| {
        for start in (0..n).step_by(CHUNK) {
            let rows: Vec<usize> = (start..(start + CHUNK).min(n)).collect();
            let inp = data.inputs(&rows, None, model.device());
            let ((qm, qv), ql) = model.encode(&inp, false);
            let z = &qm + qv.sqrt() * qm.randn_like();
            let log_library = match ql {
                Some((lm, lv)) => &lm + lv.sqrt() * lm.randn_like(),
                None => inp.log_library.shallow_clone(),
            };
            let d = model.decode(&z, &log_library, &inp.design, &inp.batch, false);
            let x = match model.cfg.likelihood {
                Likelihood::Poisson => d.rate.poisson(),
                lik => {
                    let theta = d.theta.expand_as(&d.rate);
                    let gamma = theta.internal_standard_gamma() * (&d.rate / (&theta + 1e-8));
                    let x = gamma.clamp(0.0, 1e8).poisson();
                    match (lik, &d.pi_logits) {
                        (Likelihood::Zinb, Some(pi)) => x * pi.sigmoid().bernoulli().neg().g_add_scalar(1.0),
                        _ => x,
                    }
                }
            };
            let dense = to_vec(&x);
            let g = model.cfg.n_genes;
            for k in 0..rows.len() {
                let (mut idx, mut val) = (Vec::new(), Vec::new());
                for (j, &v) in dense[k * g..(k + 1) * g].iter().enumerate() {
                    if v != 0.0 {
                        idx.push(j as u32);
                        val.push(v);
                    }
                }
                rows_out.push((idx, val));
            }
        }
    });
    Csr::from_rows(rows_out, model.cfg.n_genes)
}
