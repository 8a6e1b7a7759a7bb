//! extendr glue of distill() (mirrors R/distill.R).

use crate::convert::from_r;
use crate::disk::{check_library, h5_dataset, Input, LatentTarget};
use crate::model::pass_record;
use crate::model::{fitted_to_r, with_epoch_progress};
use crate::{fail, int_slice, strings};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::{Categorical, CellsH5, Embedding};
use scdistill_core::device::parse_device;
use scdistill_core::models::distill::{DistillConfig, DistillCounts, DistillData, DistillModel, Phase, Teacher};
use scdistill_core::train::TrainConfig;

/// Trains a student. `input_genes` / `decoder_genes`: 1-based columns of
/// the counts; `teacher`: cells × d column-major; `config`, `train_encoder`
/// and `train_decoder`: named lists of the core's `DistillConfig` and
/// `TrainConfig` fields; `progress(phase, epoch, train loss, validation
/// loss)` on the R thread (for counts on disk, `Input::from_r`'s, also
/// the passes that read the library sizes, phase "scan", and Z, phase
/// "latent"); `library`: NULL, or for counts on disk each cell's total
/// from the teacher's pass (then the file is not scanned for them);
/// `teacher` may instead be list(path, name), an HDF5 dataset that
/// `rs_h5_cells_write()` wrote (counts on disk only); `latent_file`: NULL,
/// or list(path, name) of a new dataset to write Z into (then `latent` is
/// NULL);
/// `teacher_protects` the covariates the teacher kept (character, kept in
/// the model's description). Returns list(ptr, latent (cells × d)).
/// @noRd
#[extendr]
#[allow(clippy::too_many_arguments)]
fn rs_fit_distill(
    counts: List,
    batch: Robj,
    levels: Robj,
    input_genes: Robj,
    decoder_genes: Robj,
    teacher: Robj,
    teacher_dim: i32,
    teacher_name: &str,
    teacher_protects: Robj,
    library: Robj,
    config: Robj,
    train_encoder: Robj,
    train_decoder: Robj,
    device: &str,
    threads: i32,
    latent_file: Robj,
    progress: Robj,
) -> Result<Robj> {
    let input = Input::from_r(&counts)?;
    let n = input.n_cells();
    let d = teacher_dim.max(0) as usize;
    let teacher = if teacher.is_list() {
        let (path, name) = h5_dataset(&teacher, "the teacher's file")?;
        Teacher::File(CellsH5::open(&path, &name, n, d).map_err(fail)?)
    } else {
        let values = teacher.as_real_slice().ok_or_else(|| fail("the teacher embedding must be a double matrix"))?;
        if values.len() != n * d {
            return Err(fail(format!("the teacher embedding has {} values; expected cells ({n}) × {d}", values.len())));
        }
        Teacher::Memory(Embedding::column_major(values, n, d))
    };
    // The student's Z: written straight into the R matrix returned (no
    // other copy: 400 MB at 10^6 cells and 50 dimensions), or to its file.
    let mut latent = LatentTarget::from_r(&latent_file, n, d)?;
    let codes: Vec<u32> = int_slice(&batch, "batch")?.iter().map(|&c| (c - 1).max(0) as u32).collect();
    let batch = Categorical::new("batch", codes, strings(&levels, "levels")?, n, 1).map_err(fail)?;
    let cols = |x: &Robj, what: &str| -> Result<Vec<usize>> {
        Ok(int_slice(x, what)?.iter().map(|&c| (c - 1).max(0) as usize).collect())
    };
    let (input_genes, output) = (cols(&input_genes, "input genes")?, cols(&decoder_genes, "decoder genes")?);
    let protects = if teacher_protects.len() == 0 { vec![] } else { strings(&teacher_protects, "teacher_protects")? };
    let config: DistillConfig = from_r(&config, "distillation settings")?;
    let t1: TrainConfig = from_r(&train_encoder, "encoder training settings")?;
    let t2: TrainConfig = from_r(&train_decoder, "decoder training settings")?;
    let device = parse_device(device).map_err(fail)?;
    // The teacher's library sizes, when its pass over the file has them (read here, on R's thread).
    let given: Option<&[f64]> = library.as_real_slice();
    let z = latent.out();
    let model = with_epoch_progress(threads, &progress, |interrupted, report| {
        let phase = |p: Phase| if p == Phase::Encoder { "encoder" } else { "decoder" };
        let sizes;
        let counts = match &input {
            Input::Memory(m) => DistillCounts::Memory(m),
            Input::Disk(disk, genes) => {
                sizes = match given {
                    Some(l) => l.to_vec(),
                    None => disk.scan(&|done, total| report("scan", &pass_record(done, total)), interrupted)?.row_sums,
                };
                check_library(disk, &sizes)?;
                DistillCounts::Disk { disk, genes, library: &sizes }
            }
        };
        let data = DistillData {
            counts,
            input_genes: &input_genes,
            decoder_genes: &output,
            batch: &batch,
            teacher,
            teacher_name: teacher_name.to_string(),
            teacher_protects: protects.clone(),
        };
        let encoded = |done, total| report("latent", &pass_record(done, total));
        DistillModel::fit_into(&data, config, t1, t2, device, interrupted, &|p, r| report(phase(p), r), &encoded, z)
    })?;
    Ok(fitted_to_r(Box::new(model), latent.into_r()))
}

extendr_module! {
    mod distill;
    fn rs_fit_distill;
}
