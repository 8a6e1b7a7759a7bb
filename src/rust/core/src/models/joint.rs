//! Joint fine-tuning of a VAE and a soft clustering of its latent space
//! (DiffBio trains its pipeline's stages end to end). The VAE is trained
//! further on its negative ELBO plus λ times a clustering loss of each
//! cell's posterior mean μ_z(x): the KL divergence from the clustering's
//! soft assignments q_ik = softmax_k(log π_k − ‖μ_z(x_i) − c_k‖² / T) to
//! sharpened targets p_ik ∝ q_ik² / Σ_j q_jk (DEC's self-training, Xie et
//! al. 2016; scDeepCluster uses it with a count autoencoder). The targets,
//! the centroids c_k and the weights π_k are fixed within an epoch and set
//! at its start from every cell's posterior mean (c_k and π_k as one EM step
//! of the clustering's Gaussian mixture: the q-weighted means and the mean
//! assignments), so the loss measures the present clusters. T stays the
//! clustering's.
//!
//! The loss reads the posterior mean without dropout (a second encoder pass,
//! eval mode, with gradients): under the training pass's dropout many cells
//! look ambiguous between clusters, and the loss then moved them across
//! (three simulated types, λ = 10: ARI 0.88 -> 0.55). Without dropout it
//! leaves them (0.89).
//!
//! The penalty is not part of the ELBO: the validation ELBO, and early
//! stopping on it, are the VAE's own.

use crate::error::{check_param, invalid, Result};
use crate::models::clusters::{soft_logits, ClusterModel, Temperature};
use crate::models::fitted::{Cells, Matrix};
use crate::models::vae::{infer, Vae, VaeData, VaeModel};
use crate::train::{train, EpochRecord, LossTerms, TrainConfig, Trainable, TrainingRecord};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// How a model was fine-tuned jointly with a clustering; kept in both.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JointRecord {
    /// λ, the weight of the clustering's free energy per cell.
    pub weight: f64,
    pub n_clusters: usize,
    pub training: TrainingRecord,
}

/// A fine-tuned copy of `vae` and `clusters`, and the latent space of `cells`.
pub struct JointFit {
    pub vae: VaeModel,
    pub clusters: ClusterModel,
    pub latent: Matrix,
}

/// Fine-tunes copies of `vae` and of `clusters` (an unsupervised clustering
/// of `vae`'s latent space) on `cells` with clustering weight `weight`.
pub fn fine_tune(
    vae: &VaeModel,
    clusters: &ClusterModel,
    cells: Cells,
    weight: f64,
    train_cfg: TrainConfig,
    interrupted: &dyn Fn() -> bool,
    on_epoch: &dyn Fn(&EpochRecord),
) -> Result<JointFit> {
    check_param(weight >= 0.0 && weight.is_finite(), "weight", "must be a finite number >= 0")?;
    if clusters.meta.supervised {
        return invalid!(
            "joint fine-tuning needs an unsupervised clustering; this one was fitted on labels (a classifier)"
        );
    }
    let d = vae.meta.config.n_latent;
    if clusters.meta.config.n_latent != d {
        return invalid!(
            "the clustering was fitted on a {}-dimensional space, the VAE's latent space has {d} dimensions",
            clusters.meta.config.n_latent
        );
    }
    train_cfg.check()?;
    let (csr, cov) = vae.prepare(cells, false)?;
    let device = vae.vae.device();
    let mut tuned = VaeModel::from_bytes(&vae.to_bytes()?, device)?;
    let mut clusters = ClusterModel::from_bytes(&clusters.to_bytes()?)?;
    crate::device::seed_torch(train_cfg.seed);
    let data = VaeData::new(&csr, &cov);
    let (centroids, log_weights) = clusters.centers();
    let task = JointTask {
        model: &tuned.vae,
        data: &data,
        centroids: centroids.to_device(device),
        log_weights: log_weights.to_device(device),
        targets: Tensor::zeros([csr.n_rows as i64, clusters.meta.levels.len() as i64], (Kind::Float, device)),
        temperature: Temperature::of(&clusters.meta, device),
        weight,
    };
    let history = train(&task, &train_cfg, interrupted, on_epoch)?;
    // The centroids of the weights training kept (early stopping may have
    // restored an earlier epoch's), from the cells' final latent space.
    let latent = Matrix::new(csr.n_rows, d, task.update_centers());
    let record = JointRecord {
        weight,
        n_clusters: clusters.meta.levels.len(),
        training: TrainingRecord::new(train_cfg, history, csr.n_rows),
    };
    clusters.set_centers(&task.centroids.to_device(tch::Device::Cpu), &task.log_weights.to_device(tch::Device::Cpu));
    clusters.meta.fine_tuned = Some(record.clone());
    tuned.meta.fine_tuned = Some(record);
    Ok(JointFit { vae: tuned, clusters, latent })
}

struct JointTask<'a> {
    model: &'a Vae,
    data: &'a VaeData<'a>,
    /// [K, d] and [K]: updated in place at each epoch's start.
    centroids: Tensor,
    log_weights: Tensor,
    /// p, the sharpened assignments of every cell [cells, K].
    targets: Tensor,
    temperature: Temperature,
    weight: f64,
}

impl JointTask<'_> {
    /// log π_k − ‖z_i − c_k‖² / T: [cells, K].
    fn logits(&self, z: &Tensor) -> Tensor {
        soft_logits(z, &self.centroids, &self.log_weights, &self.temperature)
    }

    /// One EM step on every cell's posterior mean: c_k = Σ_i q_ik z_i / Σ_i q_ik,
    /// log π_k = log mean_i q_ik; then the targets p_ik ∝ q_ik² / Σ_j q_jk.
    /// Returns the posterior means it used (cells × d, row-major).
    fn update_centers(&self) -> Vec<f32> {
        let n = self.data.n_cells();
        let d = self.model.cfg.n_latent as i64;
        let z = infer::latent(self.model, self.data, true);
        let dev = self.centroids.device();
        tch::no_grad(|| {
            let z = Tensor::from_slice(&z).view([n as i64, d]).to_device(dev);
            let p = self.logits(&z).softmax(-1, Kind::Float);
            let mass = p.sum_dim_intlist(0, false, Kind::Float);
            // An emptied cluster keeps its centroid (and a tiny weight).
            let means = p.transpose(0, 1).matmul(&z) / mass.clamp_min(1e-12).unsqueeze(1);
            let keep = mass.gt(1e-6).unsqueeze(1);
            let new = means.where_self(&keep, &self.centroids);
            self.centroids.shallow_clone().copy_(&new);
            self.log_weights.shallow_clone().copy_(&(mass / n as f64).clamp_min(1e-12).log());
            let q = self.logits(&z).softmax(-1, Kind::Float);
            let sharp = q.square();
            let p = &sharp / sharp.sum_dim_intlist(-1, true, Kind::Float);
            self.targets.shallow_clone().copy_(&p);
        });
        z
    }
}

impl Trainable for JointTask<'_> {
    fn var_store(&self) -> &nn::VarStore {
        &self.model.vs
    }

    fn n_cells(&self) -> usize {
        self.data.n_cells()
    }

    fn start_epoch(&self, _epoch: usize) {
        let _ = self.update_centers();
    }

    fn loss(&self, rows: &[usize], train: bool) -> LossTerms {
        let inp = self.data.inputs(rows, None, self.model.device());
        let ((qm, qv), ql) = self.model.encode(&inp, train);
        // KL(p || q) per cell: Σ_k p (log p − log q).
        let idx = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(qm.device());
        let p = self.targets.index_select(0, &idx);
        // The posterior mean as latent() reads it: no dropout (see above).
        let ((qm_eval, _), _) = self.model.encode(&inp, false);
        let log_q = self.logits(&qm_eval).log_softmax(-1, Kind::Float);
        let kl = (&p * (p.clamp_min(1e-12).log() - log_q)).sum_dim_intlist(-1, false, Kind::Float);
        let mut terms = self.model.loss_from_posterior(&inp, (qm, qv), ql, train);
        terms.penalty = Some(kl.mean(Kind::Float) * self.weight);
        terms
    }
}

#[cfg(test)]
#[path = "joint_tests.rs"]
mod tests;
