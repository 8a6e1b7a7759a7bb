//! Chromatin accessibility (ATAC peaks) for the simulated cells. A peak is
//! linked to a random gene with probability `link_prob` and then follows that
//! gene's cell-type and condition factors; unlinked peaks get cell-type
//! factors of their own. With `atac_only_groups = m`, the last m cell types
//! copy the RNA profile of the first one (RNA cannot tell them apart) while
//! their peaks differ: the signal is in ATAC only. Counts are Poisson around
//! library × normalized accessibility, with per-peak batch factors; `binary`
//! clips them at 1.

use super::SimParams;
use crate::data::{Csr, H5adWriter};
use crate::error::{check_param, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, LogNormal, Poisson};

/// Parameters of the ATAC modality.
#[derive(Debug, Clone)]
pub struct AtacParams {
    pub n_peaks: usize,
    /// Probability that a peak is linked to a gene.
    pub link_prob: f64,
    /// Fraction of unlinked peaks with a cell-type effect of their own.
    pub private_de_prob: f64,
    /// Log-normal location and scale of peak effects.
    pub de_fac_loc: f64,
    pub de_fac_scale: f64,
    /// Fragments per cell ~ LogNormal(lib_loc, lib_scale).
    pub lib_loc: f64,
    pub lib_scale: f64,
    /// The last `atac_only_groups` cell types differ from the first in ATAC only.
    pub atac_only_groups: usize,
    pub binary: bool,
}

impl Default for AtacParams {
    fn default() -> Self {
        AtacParams {
            n_peaks: 5000,
            link_prob: 0.5,
            private_de_prob: 0.2,
            de_fac_loc: 0.7,
            de_fac_scale: 0.4,
            lib_loc: 8.0,
            lib_scale: 0.3,
            atac_only_groups: 0,
            binary: false,
        }
    }
}

impl AtacParams {
    pub fn validate(&self, n_groups: usize) -> Result<()> {
        check_param(self.n_peaks >= 2, "n_peaks", "must be at least 2")?;
        check_param((0.0..=1.0).contains(&self.link_prob), "link_prob", "must be in [0, 1]")?;
        check_param((0.0..=1.0).contains(&self.private_de_prob), "private_de_prob", "must be in [0, 1]")?;
        check_param(self.de_fac_scale >= 0.0 && self.lib_scale >= 0.0, "atac scales", "must be >= 0")?;
        check_param(
            self.atac_only_groups < n_groups,
            "atac_only_groups",
            format!("must be smaller than the number of cell types ({n_groups})"),
        )
    }
}

/// Simulated peaks and their truth.
#[derive(Debug, Clone)]
pub struct AtacSimulation {
    pub counts: Csr,
    pub peaks: Vec<String>,
    /// The gene each peak is linked to, if any.
    pub linked_gene: Vec<Option<usize>>,
    /// Cell-type factors of each peak, [group][peak].
    pub group_factor: Vec<Vec<f64>>,
}

/// Peaks for cells with the given cell type, batch and condition codes.
/// `gene_group_factor` and `gene_condition_factor` are the RNA's (after any
/// copying for `atac_only_groups`). With `file`, the cells' peaks are
/// appended to it block by block (`super::rows_or_file`) and the returned
/// counts have no rows: each cell has its own random stream, so the file
/// holds the cells drawn without it.
#[allow(clippy::too_many_arguments)]
pub(super) fn simulate_atac(
    p: &SimParams,
    a: &AtacParams,
    group: &[u32],
    batch: &[u32],
    condition: &[u32],
    gene_group_factor: &[Vec<f64>],
    gene_condition_factor: &[Vec<f64>],
    seed: u64,
    file: Option<&mut H5adWriter>,
) -> Result<AtacSimulation> {
    let n_groups = p.n_groups();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::MAX - 1);
    let base_dist = Gamma::new(0.5, 1.0).expect("constant");
    let base: Vec<f64> = (0..a.n_peaks).map(|_| base_dist.sample(&mut rng)).collect();
    let linked_gene: Vec<Option<usize>> =
        (0..a.n_peaks).map(|_| (rng.random::<f64>() < a.link_prob).then(|| rng.random_range(0..p.n_genes))).collect();
    let effect = LogNormal::new(a.de_fac_loc, a.de_fac_scale).expect("validated");
    let draw_factor = |rng: &mut ChaCha8Rng| {
        if rng.random::<f64>() < a.private_de_prob {
            let f = effect.sample(rng);
            if rng.random::<f64>() < 0.5 {
                1.0 / f
            } else {
                f
            }
        } else {
            1.0
        }
    };
    let mut group_factor: Vec<Vec<f64>> = (0..n_groups)
        .map(|_| {
            (0..a.n_peaks)
                .map(|k| match linked_gene[k] {
                    Some(_) => 1.0,
                    None => draw_factor(&mut rng),
                })
                .collect()
        })
        .collect();
    // ATAC-only groups: peaks of their own, on top of the first group's RNA.
    for t in n_groups - a.atac_only_groups..n_groups {
        for k in 0..a.n_peaks {
            let own = draw_factor(&mut rng);
            group_factor[t][k] = if linked_gene[k].is_some() { own } else { group_factor[t][k] * own };
        }
    }
    for (t, factors) in group_factor.iter_mut().enumerate() {
        for (k, f) in factors.iter_mut().enumerate() {
            if let Some(g) = linked_gene[k] {
                *f *= gene_group_factor[t][g];
            }
        }
    }
    let batch_effect = LogNormal::new(p.batch_fac_loc, p.batch_fac_scale).expect("validated");
    let batch_factor: Vec<Vec<f64>> = (0..p.n_batches())
        .map(|_| (0..a.n_peaks).map(|_| super::lognormal_factor(&mut rng, &batch_effect, 0.5)).collect())
        .collect();
    let cell = |i: usize, idx: &mut Vec<u32>, val: &mut Vec<f32>| {
        let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0xA7AC);
        r.set_stream(i as u64 + 1);
        let (t, b) = (group[i] as usize, batch[i] as usize);
        let shift = p.batch_lib_shift.get(b).copied().unwrap_or(0.0);
        let lib = LogNormal::new(a.lib_loc + shift, a.lib_scale).expect("validated").sample(&mut r);
        let raw: Vec<f64> = (0..a.n_peaks)
            .map(|k| {
                let cond = match linked_gene[k] {
                    Some(g) if condition[i] == 1 => gene_condition_factor[t][g],
                    _ => 1.0,
                };
                base[k] * group_factor[t][k] * batch_factor[b][k] * cond
            })
            .collect();
        let total: f64 = raw.iter().sum();
        for (k, v) in raw.iter().enumerate() {
            let rate = lib * v / total;
            let c = if rate > 0.0 { Poisson::new(rate).map(|d| d.sample(&mut r)).unwrap_or(0.0) } else { 0.0 };
            if c > 0.0 {
                idx.push(k as u32);
                val.push(if a.binary { 1.0 } else { c as f32 });
            }
        }
    };
    let (counts, _) = super::rows_or_file(group.len(), a.n_peaks, file, cell)?;
    let peaks = (1..=a.n_peaks).map(|k| format!("Peak{k}")).collect();
    Ok(AtacSimulation { counts, peaks, linked_gene, group_factor })
}
