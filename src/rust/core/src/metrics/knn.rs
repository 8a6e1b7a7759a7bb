//! Exact k-nearest-neighbour graph of an embedding (Euclidean), computed in
//! blocks of query cells: squared distances ‖x‖² + ‖y‖² − 2·x·y with one
//! dense product per block (faer), blocks in parallel (rayon). The cell itself
//! is not its own neighbour; ties go to the lower index, so the graph is
//! deterministic.

use crate::error::{check_param, Result};
use faer::{Accum, Mat, Par};
use rayon::prelude::*;

/// Neighbours of every cell, nearest first: `indices[i * k + j]` is the j-th
/// neighbour of cell i, `distances` the Euclidean distance to it.
#[derive(Debug, Clone)]
pub struct Knn {
    pub n: usize,
    pub k: usize,
    pub indices: Vec<u32>,
    pub distances: Vec<f64>,
}

impl Knn {
    pub fn neighbors(&self, i: usize) -> &[u32] {
        &self.indices[i * self.k..(i + 1) * self.k]
    }

    pub fn dists(&self, i: usize) -> &[f64] {
        &self.distances[i * self.k..(i + 1) * self.k]
    }
}

/// An embedding of `n` cells in `d` dimensions, row-major.
pub struct Embedding<'a> {
    pub values: &'a [f64],
    pub n: usize,
    pub d: usize,
}

impl Embedding<'_> {
    pub fn row(&self, i: usize) -> &[f64] {
        &self.values[i * self.d..(i + 1) * self.d]
    }
}

const BLOCK: usize = 512;

/// The `k` nearest neighbours of every cell.
pub fn knn(x: &Embedding, k: usize) -> Result<Knn> {
    let (n, d) = (x.n, x.d);
    check_param(k >= 1 && k < n, "k", format!("must be between 1 and the number of cells - 1 ({})", n - 1))?;
    check_param(x.values.iter().all(|v| v.is_finite()), "embedding", "must not contain NA/NaN/Inf")?;
    let all = Mat::<f64>::from_fn(n, d, |i, j| x.values[i * d + j]);
    let norms: Vec<f64> = (0..n).map(|i| x.row(i).iter().map(|v| v * v).sum()).collect();
    let starts: Vec<usize> = (0..n).step_by(BLOCK).collect();
    let blocks: Vec<(Vec<u32>, Vec<f64>)> = starts
        .par_iter()
        .map(|&start| {
            let end = (start + BLOCK).min(n);
            let q = all.subrows(start, end - start);
            let mut prod = Mat::<f64>::zeros(end - start, n);
            faer::linalg::matmul::matmul(prod.as_mut(), Accum::Replace, q, all.transpose(), 1.0, Par::Seq);
            let mut idx = Vec::with_capacity((end - start) * k);
            let mut dist = Vec::with_capacity((end - start) * k);
            let mut cand: Vec<(f64, u32)> = Vec::with_capacity(n);
            for (r, i) in (start..end).enumerate() {
                cand.clear();
                cand.extend(
                    (0..n).filter(|&j| j != i).map(|j| ((norms[i] + norms[j] - 2.0 * prod[(r, j)]).max(0.0), j as u32)),
                );
                let by = |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
                cand.select_nth_unstable_by(k - 1, by);
                cand[..k].sort_unstable_by(by);
                for &(d2, j) in &cand[..k] {
                    idx.push(j);
                    dist.push(d2.sqrt());
                }
            }
            (idx, dist)
        })
        .collect();
    let mut indices = Vec::with_capacity(n * k);
    let mut distances = Vec::with_capacity(n * k);
    for (i, dd) in blocks {
        indices.extend(i);
        distances.extend(dd);
    }
    Ok(Knn { n, k, indices, distances })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_on_a_line() {
        // points 0, 1, 3, 7, 8 on a line
        let v = [0.0, 1.0, 3.0, 7.0, 8.0];
        let g = knn(&Embedding { values: &v, n: 5, d: 1 }, 2).unwrap();
        assert_eq!(g.neighbors(0), &[1, 2]);
        assert_eq!(g.neighbors(2), &[1, 0]);
        assert_eq!(g.neighbors(4), &[3, 2]);
        assert!((g.dists(2)[1] - 3.0).abs() < 1e-12);
        assert!(knn(&Embedding { values: &v, n: 5, d: 1 }, 5).is_err());
    }

    #[test]
    fn blocks_agree_with_brute_force() {
        let n = 1200; // more than two blocks
        let v: Vec<f64> = (0..n * 3).map(|i| ((i * 7919) % 1000) as f64 / 100.0 + (i as f64).sin()).collect();
        let e = Embedding { values: &v, n, d: 3 };
        let g = knn(&e, 5).unwrap();
        for &i in &[0usize, 511, 512, 1199] {
            let mut all: Vec<(f64, usize)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| ((0..3).map(|c| (e.row(i)[c] - e.row(j)[c]).powi(2)).sum::<f64>().sqrt(), j))
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for t in 0..5 {
                assert!((g.dists(i)[t] - all[t].0).abs() < 1e-9);
            }
        }
    }
}
