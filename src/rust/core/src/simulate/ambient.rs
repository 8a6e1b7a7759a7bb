//! Ambient RNA contamination with known truth, CellBender's generative
//! picture (Fleming et al. 2023): lysed cells release RNA into the
//! suspension, and every droplet, empty or not, captures some of it.
//!
//! * The ambient profile p is the pooled expression of the cells (the
//!   soup comes from the same cells), p_g = Σ_n x_ng / Σ x.
//! * Each droplet captures A ~ LogNormal(log m, 0.4) ambient molecules,
//!   independently of its cell's size; m is chosen so that a cell of median
//!   size has `mean_fraction` ambient molecules among its observed ones.
//! * Those molecules are drawn from p (A ~ Poisson with mean A, genes by
//!   p): observed counts = clean counts + ambient counts.
//! * `n_empty` empty droplets hold ambient molecules only.

use crate::data::Csr;
use crate::error::{check_param, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Poisson};

#[derive(Debug, Clone)]
pub struct AmbientParams {
    /// Ambient share of a median cell's observed counts.
    pub mean_fraction: f64,
    pub n_empty: usize,
    pub seed: u64,
}

/// Contaminated counts and their truth.
#[derive(Debug, Clone)]
pub struct Contamination {
    pub observed: Csr,
    /// Ambient molecules added to each cell.
    pub ambient_counts: Vec<f64>,
    /// Ambient share of each cell's observed counts.
    pub fraction: Vec<f64>,
    pub profile: Vec<f64>,
    /// Empty droplets (rows) over the same genes.
    pub empty: Csr,
}

/// `n` molecules drawn from the profile whose cumulative sums are `cum`, as a sparse row.
fn draw_molecules(n: u64, cum: &[f64], rng: &mut ChaCha8Rng) -> (Vec<u32>, Vec<f32>) {
    let mut genes: Vec<u32> = (0..n)
        .map(|_| {
            let u = rng.random::<f64>() * cum[cum.len() - 1];
            cum.partition_point(|&c| c <= u).min(cum.len() - 1) as u32
        })
        .collect();
    genes.sort_unstable();
    let (mut idx, mut val) = (Vec::new(), Vec::<f32>::new());
    for g in genes {
        if idx.last() == Some(&g) {
            *val.last_mut().unwrap_or(&mut 0.0) += 1.0;
        } else {
            idx.push(g);
            val.push(1.0);
        }
    }
    (idx, val)
}

/// Adds ambient molecules to the clean counts `clean` (cells as rows) and
/// makes empty droplets of the same soup.
pub fn contaminate(clean: &Csr, p: &AmbientParams) -> Result<Contamination> {
    check_param(p.mean_fraction > 0.0 && p.mean_fraction < 1.0, "fraction", "must be in (0, 1)")?;
    check_param(clean.n_rows >= 1 && clean.nnz() > 0, "counts", "must have counts")?;
    let mut profile = vec![0.0f64; clean.n_cols];
    for (&j, &v) in clean.indices.iter().zip(&clean.values) {
        profile[j as usize] += v as f64;
    }
    let total: f64 = profile.iter().sum();
    profile.iter_mut().for_each(|v| *v /= total);
    let mut cum = profile.clone();
    for g in 1..cum.len() {
        cum[g] += cum[g - 1];
    }
    let mut libs = clean.row_sums();
    libs.sort_unstable_by(|a, b| a.total_cmp(b));
    let median = libs[libs.len() / 2].max(1.0);
    let m = median * p.mean_fraction / (1.0 - p.mean_fraction);
    let size = LogNormal::new(m.ln(), 0.4).map_err(|e| crate::error::Error::InvalidInput(e.to_string()))?;
    let draw = |stream: u64| -> (f64, (Vec<u32>, Vec<f32>)) {
        let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
        rng.set_stream(stream);
        let a = size.sample(&mut rng);
        let n = Poisson::new(a).map(|d| d.sample(&mut rng) as u64).unwrap_or(0);
        (n as f64, draw_molecules(n, &cum, &mut rng))
    };
    let (mut rows, mut ambient_counts, mut fraction) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..clean.n_rows {
        let (n, amb) = draw(1 + i as u64);
        let row = Csr::add_rows(clean.row(i), (&amb.0, &amb.1));
        let obs: f64 = row.1.iter().map(|&v| v as f64).sum();
        ambient_counts.push(n);
        fraction.push(if obs > 0.0 { n / obs } else { 0.0 });
        rows.push(row);
    }
    let empty = (0..p.n_empty).map(|e| draw(1 + (clean.n_rows + e) as u64).1).collect();
    Ok(Contamination {
        observed: Csr::from_rows(rows, clean.n_cols),
        ambient_counts,
        fraction,
        profile,
        empty: Csr::from_rows(empty, clean.n_cols),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contamination_adds_ambient_molecules_of_the_pooled_profile() {
        // Two kinds of cells: genes 0-4 or genes 5-9, 400 counts each.
        let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..200u32)
            .map(|i| if i % 2 == 0 { ((0..5).collect(), vec![80.0; 5]) } else { ((5..10).collect(), vec![80.0; 5]) })
            .collect();
        let clean = Csr::from_rows(rows, 10);
        let c = contaminate(&clean, &AmbientParams { mean_fraction: 0.2, n_empty: 300, seed: 1 }).unwrap();
        assert!(c.profile.iter().all(|&v| (v - 0.1).abs() < 1e-12));
        // Observed = clean + ambient, cell by cell; the truth adds up.
        for i in 0..200 {
            let obs: f32 = c.observed.row(i).1.iter().sum();
            assert_eq!(obs as f64, 400.0 + c.ambient_counts[i]);
            assert!((c.fraction[i] - c.ambient_counts[i] / obs as f64).abs() < 1e-12);
        }
        let mean_fraction = c.fraction.iter().sum::<f64>() / 200.0;
        assert!((mean_fraction - 0.2).abs() < 0.03, "mean fraction {mean_fraction}");
        // A cell of genes 0-4 now has molecules of genes 5-9: the ambient ones.
        let foreign: f32 =
            c.observed.row(0).0.iter().zip(c.observed.row(0).1).filter(|(&g, _)| g >= 5).map(|(_, &v)| v).sum();
        assert!(foreign > 0.0);
        // Empty droplets hold as many molecules as cells' ambient on average.
        assert_eq!(c.empty.n_rows, 300);
        let empty_mean = c.empty.row_sums().iter().sum::<f64>() / 300.0;
        let cell_mean = c.ambient_counts.iter().sum::<f64>() / 200.0;
        assert!((empty_mean / cell_mean - 1.0).abs() < 0.15, "{empty_mean} vs {cell_mean}");
        let again = contaminate(&clean, &AmbientParams { mean_fraction: 0.2, n_empty: 300, seed: 1 }).unwrap();
        assert_eq!(again.observed.values, c.observed.values);
    }
}
