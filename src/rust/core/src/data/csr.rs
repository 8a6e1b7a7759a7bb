//! Compressed sparse rows: the one in-memory layout of a data set.

use rayon::prelude::*;

/// A sparse matrix in CSR layout with `f32` values (cells are rows).
///
/// `indptr[r]..indptr[r + 1]` are the entries of row `r`; column indices are
/// strictly increasing within a row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Csr {
    pub n_rows: usize,
    pub n_cols: usize,
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

impl Csr {
    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Column indices and values of row `r`.
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let span = self.indptr[r]..self.indptr[r + 1];
        (&self.indices[span.clone()], &self.values[span])
    }

    /// Sum of each row.
    pub fn row_sums(&self) -> Vec<f64> {
        (0..self.n_rows).into_par_iter().map(|r| self.row(r).1.iter().map(|&v| v as f64).sum()).collect()
    }

    /// Writes rows `rows` densely into `out` (row-major, `rows.len() × n_cols`).
    /// This is how minibatches are cut: only the selected rows are densified.
    pub fn dense_rows_into(&self, rows: &[usize], out: &mut [f32]) {
        self.dense_rows_map_into(rows, out, |v| v);
    }

    /// `dense_rows_into` of log(1 + value): the encoders' input, computed at
    /// the non-zeros only (log 1 = 0 keeps the zeros).
    pub fn dense_log1p_rows_into(&self, rows: &[usize], out: &mut [f32]) {
        let table = log1p_table();
        self.dense_rows_map_into(rows, out, |v| log1p_count(v, table));
    }

    /// Rows `rows` as bf16 bits, densely into `out` (row-major, `rows.len()
    /// × (n_cols + n_cov)`): the values (their log(1 + value) when `log`),
    /// then each row's `n_cov` covariates from `cov` (row-major). This is
    /// the first layer's input of a mixed-precision encoder, written in one
    /// pass (rounded to nearest even, as libtorch's cast).
    pub fn dense_bf16_rows_into(&self, rows: &[usize], log: bool, cov: &[f32], n_cov: usize, out: &mut [u16]) {
        use crate::kernels::adam::f32_to_bf16;
        let width = self.n_cols + n_cov;
        debug_assert_eq!(out.len(), rows.len() * width);
        debug_assert_eq!(cov.len(), rows.len() * n_cov);
        let table = log1p_table();
        let fill = |first: usize, rows: &[usize], out: &mut [u16]| {
            out.fill(0);
            for (k, &r) in rows.iter().enumerate() {
                let dst = &mut out[k * width..(k + 1) * width];
                let (idx, val) = self.row(r);
                for (&j, &v) in idx.iter().zip(val) {
                    dst[j as usize] = f32_to_bf16(if log { log1p_count(v, table) } else { v });
                }
                let c = &cov[(first + k) * n_cov..(first + k + 1) * n_cov];
                for (d, &x) in dst[self.n_cols..].iter_mut().zip(c) {
                    *d = f32_to_bf16(x);
                }
            }
        };
        crate::kernels::omp::on_row_blocks(rows, out, width, 1 << 16, fill);
    }

    fn dense_rows_map_into(&self, rows: &[usize], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
        debug_assert_eq!(out.len(), rows.len() * self.n_cols);
        let fill = |rows: &[usize], out: &mut [f32]| {
            out.fill(0.0);
            for (k, &r) in rows.iter().enumerate() {
                let dst = &mut out[k * self.n_cols..(k + 1) * self.n_cols];
                let (idx, val) = self.row(r);
                for (&j, &v) in idx.iter().zip(val) {
                    dst[j as usize] = f(v);
                }
            }
        };
        crate::kernels::omp::on_row_blocks(rows, out, self.n_cols, 1 << 18, |_, rows, out| fill(rows, out));
    }

    /// Keeps the columns in `keep` (in that order): a new CSR whose column `k`
    /// is old column `keep[k]`.
    pub fn select_columns(&self, keep: &[usize]) -> Csr {
        let mut map = vec![u32::MAX; self.n_cols];
        for (new, &old) in keep.iter().enumerate() {
            map[old] = new as u32;
        }
        let sorted = keep.windows(2).all(|w| w[0] < w[1]);
        let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..self.n_rows)
            .into_par_iter()
            .map(|r| {
                let (idx, val) = self.row(r);
                let mut pairs: Vec<(u32, f32)> = idx
                    .iter()
                    .zip(val)
                    .filter_map(|(&j, &v)| {
                        let m = map[j as usize];
                        (m != u32::MAX).then_some((m, v))
                    })
                    .collect();
                if !sorted {
                    pairs.sort_unstable_by_key(|p| p.0);
                }
                pairs.into_iter().unzip()
            })
            .collect();
        Csr::from_rows(rows, keep.len())
    }

    /// The rows `rows` (in that order) as a matrix of their own.
    pub fn select_rows(&self, rows: &[usize]) -> Csr {
        let mut indptr = Vec::with_capacity(rows.len() + 1);
        indptr.push(0);
        let (mut indices, mut values) = (vec![], vec![]);
        for &r in rows {
            let (i, v) = self.row(r);
            indices.extend_from_slice(i);
            values.extend_from_slice(v);
            indptr.push(indices.len());
        }
        Csr { n_rows: rows.len(), n_cols: self.n_cols, indptr, indices, values }
    }

    /// The sum of two sparse rows (column indices ascending in both).
    pub fn add_rows(a: (&[u32], &[f32]), b: (&[u32], &[f32])) -> (Vec<u32>, Vec<f32>) {
        let ((ia, va), (ib, vb)) = (a, b);
        let (mut idx, mut val) = (Vec::with_capacity(ia.len() + ib.len()), Vec::with_capacity(ia.len() + ib.len()));
        let (mut p, mut q) = (0, 0);
        while p < ia.len() || q < ib.len() {
            if q == ib.len() || (p < ia.len() && ia[p] < ib[q]) {
                idx.push(ia[p]);
                val.push(va[p]);
                p += 1;
            } else if p == ia.len() || ib[q] < ia[p] {
                idx.push(ib[q]);
                val.push(vb[q]);
                q += 1;
            } else {
                idx.push(ia[p]);
                val.push(va[p] + vb[q]);
                p += 1;
                q += 1;
            }
        }
        (idx, val)
    }

    /// Assembles a CSR from per-row (indices, values) pairs.
    pub fn from_rows(rows: Vec<(Vec<u32>, Vec<f32>)>, n_cols: usize) -> Csr {
        let nnz = rows.iter().map(|r| r.0.len()).sum();
        let mut indptr = Vec::with_capacity(rows.len() + 1);
        let mut indices = Vec::with_capacity(nnz);
        let mut values = Vec::with_capacity(nnz);
        indptr.push(0);
        for (idx, val) in &rows {
            indices.extend_from_slice(idx);
            values.extend_from_slice(val);
            indptr.push(indices.len());
        }
        Csr { n_rows: rows.len(), n_cols, indptr, indices, values }
    }

    /// Builds a matrix row by row in parallel: `row(i, indices, values)`
    /// appends the entries of row i (columns ascending) and returns a value
    /// kept per row. Rows are made in ordered rounds of chunks and appended
    /// as each round ends, so memory is the result plus one round's buffers
    /// (no per-row vectors, no second copy), and the result does not depend
    /// on the number of threads.
    pub fn build_rows<T: Send>(
        n_rows: usize,
        n_cols: usize,
        row: impl Fn(usize, &mut Vec<u32>, &mut Vec<f32>) -> T + Sync,
    ) -> (Csr, Vec<T>) {
        const CHUNK: usize = 512;
        let per_round = CHUNK * 4 * rayon::current_num_threads().max(1);
        let mut indptr = Vec::with_capacity(n_rows + 1);
        indptr.push(0usize);
        let (mut indices, mut values, mut kept) = (Vec::new(), Vec::new(), Vec::with_capacity(n_rows));
        for start in (0..n_rows).step_by(per_round) {
            let end = (start + per_round).min(n_rows);
            let chunks: Vec<(Vec<usize>, Vec<u32>, Vec<f32>, Vec<T>)> = (start..end)
                .step_by(CHUNK)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|c0| {
                    let c1 = (c0 + CHUNK).min(end);
                    let (mut ends, mut idx, mut val, mut out) =
                        (Vec::with_capacity(c1 - c0), Vec::new(), Vec::new(), Vec::with_capacity(c1 - c0));
                    for i in c0..c1 {
                        out.push(row(i, &mut idx, &mut val));
                        ends.push(idx.len());
                    }
                    (ends, idx, val, out)
                })
                .collect();
            for (ends, idx, val, out) in chunks {
                let base = indices.len();
                indptr.extend(ends.iter().map(|e| base + e));
                indices.extend_from_slice(&idx);
                values.extend_from_slice(&val);
                kept.extend(out);
            }
            if start == 0 && end < n_rows {
                // Reserve for the rest at the first round's density (+5%).
                let expected = (indices.len() as f64 / end as f64 * n_rows as f64 * 1.05) as usize;
                indices.reserve(expected.saturating_sub(indices.len()));
                values.reserve(expected.saturating_sub(values.len()));
            }
        }
        (Csr { n_rows, n_cols, indptr, indices, values }, kept)
    }

    /// Applies `f(row, value)` to every stored value, keeping the pattern.
    pub fn map_values(&self, f: impl Fn(usize, f32) -> f32 + Sync) -> Csr {
        let mut values = vec![0f32; self.nnz()];
        let mut chunks: Vec<(usize, &mut [f32])> = Vec::with_capacity(self.n_rows);
        let mut rest: &mut [f32] = &mut values;
        for r in 0..self.n_rows {
            let (head, tail) = rest.split_at_mut(self.indptr[r + 1] - self.indptr[r]);
            chunks.push((r, head));
            rest = tail;
        }
        chunks.into_par_iter().for_each(|(r, dst)| {
            for (d, &v) in dst.iter_mut().zip(self.row(r).1) {
                *d = f(r, v);
            }
        });
        Csr { values, ..self.clone_pattern() }
    }

    fn clone_pattern(&self) -> Csr {
        Csr {
            n_rows: self.n_rows,
            n_cols: self.n_cols,
            indptr: self.indptr.clone(),
            indices: self.indices.clone(),
            values: Vec::new(),
        }
    }
}

/// Whole numbers below this have their log(1 + x) in `log1p_table`.
const LOG1P_TABLE_LEN: usize = 4096;

/// log(1 + k) for k = 0, 1, …, rounded from double precision.
pub(crate) fn log1p_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..LOG1P_TABLE_LEN).map(|k| (k as f64).ln_1p() as f32).collect())
}

/// log(1 + v): looked up for the small whole numbers that make up nearly all
/// counts, computed otherwise.
#[inline]
pub(crate) fn log1p_count(v: f32, table: &[f32]) -> f32 {
    let k = v as usize; // saturates: negative and NaN give 0, checked below
    if k < table.len() && k as f32 == v {
        table[k]
    } else {
        v.ln_1p()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Csr {
        // [[1, 0, 2], [0, 0, 0], [0, 3, 4]]
        Csr { n_rows: 3, n_cols: 3, indptr: vec![0, 2, 2, 4], indices: vec![0, 2, 1, 2], values: vec![1., 2., 3., 4.] }
    }

    #[test]
    fn dense_rows_match_the_matrix() {
        let m = small();
        let mut out = vec![9.0; 6];
        m.dense_rows_into(&[2, 0], &mut out);
        assert_eq!(out, vec![0., 3., 4., 1., 0., 2.]);
    }

    #[test]
    fn select_columns_reorders_and_drops() {
        let m = small().select_columns(&[2, 0]);
        let mut out = vec![0.0; 6];
        m.dense_rows_into(&[0, 1, 2], &mut out);
        assert_eq!(out, vec![2., 1., 0., 0., 4., 0.]);
        assert_eq!(m.row_sums(), vec![3., 0., 4.]);
    }

    #[test]
    fn map_values_keeps_pattern() {
        let m = small().map_values(|r, v| v * 10.0 + r as f32);
        assert_eq!(m.values, vec![10., 20., 32., 42.]);
        assert_eq!(m.indices, small().indices);
    }
}
