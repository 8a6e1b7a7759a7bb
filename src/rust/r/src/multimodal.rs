//! extendr glue of fit_multimodal() and modality_attribution() (mirrors R/multimodal.R).

use crate::convert::from_r;
use crate::disk::{check_scan, Input};
use crate::fail;
use crate::model::{cells_from_r, fitted_to_r, model_as, pass_record, with_epoch_progress};
use crate::vae::categorical_list;
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::{CountMatrix, DiskCsr};
use scdistill_core::device::parse_device;
use scdistill_core::models::multimodal::{MultimodalConfig, MultimodalCovariates, MultimodalData, MultimodalModel};
use scdistill_core::models::LatentOut;
use scdistill_core::train::{EpochRecord, TrainConfig};

/// The modalities' counts from a list of count slot lists, or of on-disk
/// descriptions (`Input::from_r`); all in memory or all on disk.
enum Modalities {
    Memory(Vec<CountMatrix>),
    Disk(Vec<(DiskCsr, Vec<String>)>),
}

fn modality_counts(counts: &List) -> Result<Modalities> {
    let inputs = counts
        .values()
        .map(|v| Input::from_r(&List::try_from(v).map_err(|_| fail("internal: modality counts must be a list"))?))
        .collect::<Result<Vec<Input>>>()?;
    let (mut memory, mut disk) = (vec![], vec![]);
    for i in inputs {
        match i {
            Input::Memory(m) => memory.push(m),
            Input::Disk(d, genes) => disk.push((d, genes)),
        }
    }
    match (memory.is_empty(), disk.is_empty()) {
        (_, true) => Ok(Modalities::Memory(memory)),
        (true, false) => {
            let (mut disks, genes): (Vec<DiskCsr>, Vec<Vec<String>>) = disk.into_iter().unzip();
            DiskCsr::in_step(&mut disks).map_err(fail)?;
            Ok(Modalities::Disk(disks.into_iter().zip(genes).collect()))
        }
        _ => Err(fail("internal: modalities partly in memory and partly on disk")),
    }
}

impl Modalities {
    fn n_cells(&self) -> usize {
        match self {
            Modalities::Memory(m) => m.first().map_or(0, |m| m.n_cells()),
            Modalities::Disk(d) => d.first().map_or(0, |(d, _)| d.n_rows()),
        }
    }
}

/// Training covariates: list(ambient, scaling, dispersion, library, decoder, encoder),
/// the first four list(name, codes, levels), the last two lists of them.
fn covariates_from_r(cov: &List, n: usize) -> Result<MultimodalCovariates> {
    let get = |k: &str| cov.iter().find(|(n, _)| *n == k).map(|(_, v)| v);
    let one = |key: &str| -> Result<scdistill_core::data::Categorical> {
        let v = get(key).ok_or_else(|| fail(format!("internal: no `{key}` covariate")))?;
        categorical_list(&List::try_from(v).map_err(|_| fail("internal: covariate must be a list"))?, n)
    };
    let many = |key: &str| -> Result<Vec<scdistill_core::data::Categorical>> {
        match get(key) {
            None => Ok(vec![]),
            Some(v) => List::try_from(v)
                .map_err(|_| fail("internal: covariates must be a list"))?
                .values()
                .map(|c| categorical_list(&List::try_from(c).map_err(|_| fail("internal: covariate list"))?, n))
                .collect(),
        }
    };
    Ok(MultimodalCovariates {
        ambient: one("ambient")?,
        scaling: one("scaling")?,
        dispersion: one("dispersion")?,
        library: one("library")?,
        decoder: many("decoder")?,
        encoder: many("encoder")?,
    })
}

/// Trains a multimodal model on paired modalities (a list of count slot
/// lists, same cells); `config` holds the core's `MultimodalConfig` fields
/// (with `modalities`, a list of each modality's settings). Returns
/// list(ptr, latent = list(joint, parts)).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_multimodal(
    counts: List,
    covariates: List,
    config: Robj,
    train: Robj,
    device: &str,
    threads: i32,
    progress: Robj,
) -> Result<Robj> {
    let mats = modality_counts(&counts)?;
    let cov = covariates_from_r(&covariates, mats.n_cells())?;
    let config: MultimodalConfig = from_r(&config, "multimodal settings")?;
    let train: TrainConfig = from_r(&train, "training settings")?;
    let device = parse_device(device).map_err(fail)?;
    // The latent spaces are written straight into the R matrices returned
    // (no f32 copy of all cells beside them), as the cells are encoded.
    let n = mats.n_cells();
    let mut joint = RMatrix::<f64>::new(n, config.n_latent());
    let names: Vec<String> = config.modalities.iter().map(|m| m.name.clone()).collect();
    let mut parts: Vec<RMatrix<f64>> = config.modalities.iter().map(|m| RMatrix::<f64>::new(n, m.n_latent)).collect();
    let mut joint_out = LatentOut::Memory(joint.data_mut());
    let mut part_outs: Vec<LatentOut> = parts.iter_mut().map(|p| LatentOut::Memory(p.data_mut())).collect();
    let model = with_epoch_progress(threads, &progress, |interrupted, report| {
        let on_epoch = |r: &EpochRecord| report("train", r);
        let encoded = |done, total| report("latent", &pass_record(done, total));
        match &mats {
            Modalities::Memory(m) => {
                let refs: Vec<&CountMatrix> = m.iter().collect();
                let model = MultimodalModel::fit(&refs, &cov, config, train, device, interrupted, &on_epoch)?;
                let data = MultimodalData::new(refs.iter().map(|c| &c.csr).collect(), &cov)?;
                model.training_latent_into(&data, &encoded, interrupted, &mut joint_out, &mut part_outs)?;
                Ok(model)
            }
            Modalities::Disk(d) => {
                // One pass per modality for the per-cell totals (and the
                // checks), reported as one.
                let total = d.len() * d[0].0.n_rows();
                let mut scans = Vec::with_capacity(d.len());
                for (k, (disk, _)) in d.iter().enumerate() {
                    let at = k * disk.n_rows();
                    let scan = disk.scan(&|done, _| report("scan", &pass_record(at + done, total)), interrupted)?;
                    check_scan(disk, &scan)?;
                    scans.push(scan);
                }
                let disks: Vec<&DiskCsr> = d.iter().map(|(d, _)| d).collect();
                let features: Vec<&[String]> = d.iter().map(|(_, g)| g.as_slice()).collect();
                let model = MultimodalModel::fit_on_disk(
                    &disks,
                    &scans,
                    &features,
                    &cov,
                    config,
                    train,
                    device,
                    interrupted,
                    &on_epoch,
                )?;
                let data = MultimodalData::on_disk(&disks, &scans, &cov)?;
                model.training_latent_into(&data, &encoded, interrupted, &mut joint_out, &mut part_outs)?;
                Ok(model)
            }
        }
    })?;
    drop((joint_out, part_outs));
    let parts: Vec<(&str, Robj)> = names.iter().map(String::as_str).zip(parts.into_iter().map(Robj::from)).collect();
    let parts = List::from_pairs(parts);
    Ok(fitted_to_r(Box::new(model), list!(joint = joint, parts = parts).into()))
}

/// Modality attribution, row-major [cells, modalities, n_latent] as a flat vector.
/// @noRd
#[extendr]
fn rs_multimodal_attribution(ptr: Robj, cells: List, threads: i32) -> Result<Vec<f64>> {
    let model = crate::worker::Lent(model_as::<MultimodalModel>(&ptr, "modality_attribution()")?);
    let cells = cells_from_r(&cells)?;
    let v = crate::run(threads, |interrupted| model.get().attribution(cells, interrupted))?;
    Ok(v.into_iter().map(f64::from).collect())
}

extendr_module! {
    mod multimodal;
    fn rs_fit_multimodal;
    fn rs_multimodal_attribution;
}
