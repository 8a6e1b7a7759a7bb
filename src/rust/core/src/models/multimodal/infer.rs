//! Batched inference of a multimodal model without gradients (except where
//! attribution differentiates the decoders): latent spaces, normalized
//! expression and accessibility, modality attribution.

use super::{Multimodal, MultimodalData};
use crate::error::Result;
use crate::nn::Pass;
use tch::{Kind, Tensor};

const CHUNK: usize = 1024;

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_device(tch::Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default()
}

fn chunks(n: usize) -> impl Iterator<Item = Vec<usize>> {
    (0..n).step_by(CHUNK).map(move |s| (s..(s + CHUNK).min(n)).collect())
}

/// Latent spaces of every cell, row-major: the joint latent
/// `[cells, n_latent]` and each modality's own `[cells, n_latent_m]`;
/// posterior means, or one draw each when not `give_mean`.
pub fn latent(model: &Multimodal, data: &MultimodalData, give_mean: bool) -> (Vec<f32>, Vec<Vec<f32>>) {
    let n = data.n_cells();
    let mut joint = Vec::with_capacity(n * model.cfg.n_latent());
    let mut per: Vec<Vec<f32>> = model.cfg.modalities.iter().map(|m| Vec::with_capacity(n * m.n_latent)).collect();
    latent_each(model, data, give_mean, &|_, _| {}, &|| false, &mut |_, z, parts| {
        joint.extend_from_slice(z);
        per.iter_mut().zip(parts).for_each(|(out, p)| out.extend_from_slice(p));
        Ok(())
    })
    .expect("not interrupted");
    (joint, per)
}

/// What [`latent_each`] hands each minibatch to: its first cell, the joint
/// rows and each modality's rows (row-major).
pub type Emit<'e> = dyn FnMut(usize, &[f32], &[Vec<f32>]) -> Result<()> + 'e;

/// `latent`, each minibatch handed to `emit(first cell, joint rows, each
/// modality's rows)` in the cells' order instead of gathered;
/// `progress(cells done, all cells)` as they are encoded, and an error
/// when `interrupted()` (10^6 cells on disk take minutes).
pub fn latent_each(
    model: &Multimodal,
    data: &MultimodalData,
    give_mean: bool,
    progress: &dyn Fn(usize, usize),
    interrupted: &dyn Fn() -> bool,
    emit: &mut Emit,
) -> Result<()> {
    let n = data.n_cells();
    let watch = crate::de::Watch::new(interrupted, progress);
    watch.expect(n);
    let draw = |m: &Tensor, v: &Tensor| if give_mean { m.shallow_clone() } else { m + v.sqrt() * m.randn_like() };
    tch::no_grad(|| -> Result<()> {
        for rows in chunks(n) {
            watch.check()?;
            let inp = data.inputs(&rows, model.device());
            let (qz, _) = model.encode_modalities(&inp, Pass::Eval);
            let (qm, qv) = model.combine(&qz);
            let parts: Vec<Vec<f32>> = qz.iter().map(|(m, v)| to_vec(&draw(m, v))).collect();
            emit(rows[0], &to_vec(&draw(&qm, &qv)), &parts)?;
            watch.advance(rows.len());
        }
        Ok(())
    })
}

/// Expected expression (or accessibility) per unit library of modality
/// `m` for every cell, × `library_size`, row-major `[cells, features]`: at
/// the posterior mean latent when `n_draws` is 1, else averaged over
/// `n_draws` draws from q(z | x). Without `ambient`, the background term s
/// is left out: what the cell itself expresses.
pub fn normalized(
    model: &Multimodal,
    data: &MultimodalData,
    m: usize,
    library_size: f64,
    ambient: bool,
    n_draws: usize,
) -> Vec<f32> {
    let n = data.n_cells();
    let g = model.cfg.modalities[m].n_features;
    let mut out = Vec::with_capacity(n * g);
    tch::no_grad(|| {
        for rows in chunks(n) {
            let inp = data.inputs(&rows, model.device());
            let (qz, _) = model.encode_modalities(&inp, Pass::Eval);
            let (qm, qv) = model.combine(&qz);
            let decode = |z: &Tensor| if ambient { model.normalized(m, z, &inp) } else { model.expressed(m, z, &inp) };
            let v = if n_draws <= 1 {
                decode(&qm)
            } else {
                let mut acc = decode(&(&qm + qv.sqrt() * qm.randn_like()));
                for _ in 1..n_draws {
                    acc += decode(&(&qm + qv.sqrt() * qm.randn_like()));
                }
                acc / n_draws as f64
            };
            out.extend(to_vec(&(v * library_size)));
        }
    });
    out
}

/// Modality attribution: for each cell, modality and latent dimension d,
/// the mean absolute Jacobian of the modality's decoded mean per unit
/// library ν = (softplus(f(z)) + s) · y with respect to z_d at the posterior
/// mean z, relative to the mean of ν: Σ_g |∂ν_g/∂z_d| / Σ_g ν_g. Dividing by
/// the mean makes modalities with different count scales comparable (it is
/// the relative change of the modality's expected counts per unit of z_d).
/// Row-major `[cells, modalities, n_latent]`.
///
/// Exact, by autograd: the Jacobian-vector product J·e_d of a batch comes
/// from differentiating the vector-Jacobian product vᵀJ with respect to v
/// (the "double backward" trick), one pass per latent dimension.
pub fn attribution(model: &Multimodal, data: &MultimodalData, interrupted: &dyn Fn() -> bool) -> Vec<f32> {
    let n = data.n_cells();
    let n_mod = model.cfg.modalities.len();
    let d = model.cfg.n_latent();
    let mut out = vec![0f32; n * n_mod * d];
    for rows in chunks(n) {
        if interrupted() {
            break;
        }
        let inp = data.inputs(&rows, model.device());
        let z = tch::no_grad(|| {
            let (qz, _) = model.encode_modalities(&inp, Pass::Eval);
            model.combine(&qz).0
        })
        .detach()
        .set_requires_grad(true);
        for m in 0..n_mod {
            let nu = model.normalized(m, &z, &inp);
            let total = nu.detach().sum_dim_intlist(1, false, Kind::Float);
            let v = nu.zeros_like().set_requires_grad(true);
            // vᵀJ as a function of v (kept differentiable).
            let vjp =
                Tensor::run_backward(&[(&nu * &v).sum(Kind::Float)], &[&z], true, true).pop().expect("one gradient");
            for k in 0..d {
                let col = Tensor::run_backward(&[vjp.select(1, k as i64).sum(Kind::Float)], &[&v], true, false)
                    .pop()
                    .expect("one gradient");
                let a = to_vec(&(col.abs().sum_dim_intlist(1, false, Kind::Float) / &total));
                for (i, &r) in rows.iter().enumerate() {
                    out[(r * n_mod + m) * d + k] = a[i];
                }
            }
        }
    }
    out
}
