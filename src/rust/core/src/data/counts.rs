//! The count matrix: validated integer counts, cells × genes, in CSR.

use super::csr::Csr;
use crate::error::{invalid, Result};
use std::collections::HashMap;

/// Largest count stored exactly in an `f32`.
const MAX_EXACT_COUNT: f64 = 16_777_216.0;

/// Raw counts of `n_cells` cells × `n_genes` genes, with their names.
#[derive(Debug, Clone)]
pub struct CountMatrix {
    pub csr: Csr,
    pub genes: Vec<String>,
    pub cells: Vec<String>,
}

impl CountMatrix {
    /// Builds the matrix from a compressed-sparse-column matrix of genes × cells
    /// (the layout of an R `dgCMatrix`), which is already the CSR of cells × genes:
    /// `p` has one entry per cell plus one, `i` holds 0-based gene indices and
    /// `x` the counts. Every value and every index is checked; explicit zeros
    /// are dropped. Nothing is densified.
    pub fn from_csc_genes_by_cells(
        p: &[i32],
        i: &[i32],
        x: &[f64],
        genes: Vec<String>,
        cells: Vec<String>,
    ) -> Result<CountMatrix> {
        Self::check_csc_genes_by_cells(p, i, x, &genes, &cells)?;
        let csr = build_csr(p, i, x, genes.len());
        Ok(CountMatrix { csr, genes, cells })
    }

    /// Every check of `from_csc_genes_by_cells`, without building the matrix
    /// (validating a large matrix then costs no copy of it).
    pub fn check_csc_genes_by_cells(p: &[i32], i: &[i32], x: &[f64], genes: &[String], cells: &[String]) -> Result<()> {
        let n_genes = genes.len();
        if n_genes == 0 {
            return invalid!("the count matrix has no genes (0 rows)");
        }
        if p.len() < 2 {
            return invalid!("the count matrix has no cells (0 columns)");
        }
        let n_cells = p.len() - 1;
        if cells.len() != n_cells {
            return invalid!("{} cell names for {} cells", cells.len(), n_cells);
        }
        check_names(genes, "gene")?;
        check_structure(p, i, x, n_genes)?;
        check_values(p, i, x, genes, cells)?;
        // Cells with no counts carry no information for any model here: rather
        // than drop them silently (and misalign results with the user's
        // object), refuse. Stored zeros do not count.
        let empty: Vec<usize> =
            (0..n_cells).filter(|&c| x[p[c] as usize..p[c + 1] as usize].iter().all(|&v| v == 0.0)).collect();
        if !empty.is_empty() {
            return invalid!(
                "{} cell(s) have zero total counts (first: {}); remove them before fitting, \
                 e.g. `x <- x[, colSums(counts) > 0]`",
                empty.len(),
                quote_some(empty.iter().map(|&c| &cells[c]))
            );
        }
        Ok(())
    }

    pub fn n_cells(&self) -> usize {
        self.csr.n_rows
    }

    pub fn n_genes(&self) -> usize {
        self.csr.n_cols
    }

    /// Total counts per cell.
    pub fn library_sizes(&self) -> Vec<f64> {
        self.csr.row_sums()
    }

    /// Columns of `genes` (by name, in that order) — a model's genes in new
    /// data. Extra genes are ignored; missing ones are an error naming how
    /// many of the model's `what` genes are missing and the first few.
    pub fn columns_of(&self, genes: &[String], what: &str) -> crate::Result<Vec<usize>> {
        columns_of(&self.genes, genes, what)
    }

    /// This matrix's CSR with only the columns `keep` (in that order); no
    /// copy when `keep` is every column in order, the usual case of new data
    /// measured on a model's own genes.
    pub fn into_columns(self, keep: &[usize]) -> Csr {
        if keep.len() == self.csr.n_cols && keep.iter().enumerate().all(|(k, &c)| k == c) {
            self.csr
        } else {
            self.csr.select_columns(keep)
        }
    }

    /// The same cells restricted to the genes `keep` (in that order).
    pub fn select_genes(&self, keep: &[usize]) -> CountMatrix {
        CountMatrix {
            csr: self.csr.select_columns(keep),
            genes: keep.iter().map(|&g| self.genes[g].clone()).collect(),
            cells: self.cells.clone(),
        }
    }
}

/// Names must be present and unique: models are matched to new data by gene name.
pub(crate) fn check_names(names: &[String], what: &str) -> Result<()> {
    if let Some(k) = names.iter().position(|n| n.is_empty() || n == "NA") {
        return invalid!("{what} name number {} is missing (empty or NA); every {what} needs a name", k + 1);
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(names.len());
    let mut dups = Vec::new();
    for n in names {
        let count = seen.entry(n.as_str()).or_insert(0);
        *count += 1;
        if *count == 2 {
            dups.push(n);
        }
    }
    if !dups.is_empty() {
        return invalid!(
            "{} {what} name(s) are duplicated (first: {}); make them unique, e.g. with `make.unique()`",
            dups.len(),
            quote_some(dups.into_iter())
        );
    }
    Ok(())
}

/// The cells × genes CSR of a genes × cells CSC's slots (the same arrays),
/// checked for structure only (pointers, index ranges and order), not for
/// values or empty cells: for matrices the package made itself, such as
/// posterior predictive draws, where a cell may draw no counts. Stored zeros
/// are dropped.
pub fn csr_from_csc_slots(p: &[i32], i: &[i32], x: &[f64], n_genes: usize) -> Result<Csr> {
    if p.is_empty() {
        return invalid!("malformed sparse matrix: no column pointers");
    }
    check_structure(p, i, x, n_genes)?;
    Ok(build_csr(p, i, x, n_genes))
}

/// The CSR of checked CSC slots, without the stored zeros.
fn build_csr(p: &[i32], i: &[i32], x: &[f64], n_genes: usize) -> Csr {
    let n_cells = p.len() - 1;
    let mut indptr = Vec::with_capacity(n_cells + 1);
    let mut indices = Vec::with_capacity(x.len());
    let mut values = Vec::with_capacity(x.len());
    indptr.push(0);
    for c in 0..n_cells {
        for k in p[c] as usize..p[c + 1] as usize {
            if x[k] != 0.0 {
                indices.push(i[k] as u32);
                values.push(x[k] as f32);
            }
        }
        indptr.push(indices.len());
    }
    Csr { n_rows: n_cells, n_cols: n_genes, indptr, indices, values }
}

fn check_structure(p: &[i32], i: &[i32], x: &[f64], n_genes: usize) -> Result<()> {
    if i.len() != x.len() {
        return invalid!("malformed sparse matrix: {} row indices for {} values", i.len(), x.len());
    }
    if p[0] != 0 || p.windows(2).any(|w| w[1] < w[0]) || p[p.len() - 1] as usize != x.len() {
        return invalid!("malformed sparse matrix: column pointers are not increasing from 0 to {}", x.len());
    }
    for c in 0..p.len() - 1 {
        let col = &i[p[c] as usize..p[c + 1] as usize];
        if col.iter().any(|&g| g < 0 || g as usize >= n_genes) || col.windows(2).any(|w| w[1] <= w[0]) {
            return invalid!("malformed sparse matrix: row indices of column {} are out of range or unsorted", c + 1);
        }
    }
    Ok(())
}

/// Counts must be finite, non-negative whole numbers.
fn check_values(p: &[i32], i: &[i32], x: &[f64], genes: &[String], cells: &[String]) -> Result<()> {
    let bad =
        |ok: &dyn Fn(f64) -> bool| x.iter().position(|&v| !ok(v)).map(|k| (k, x.iter().filter(|&&v| !ok(v)).count()));
    let locate = |k: usize| {
        let c = p.partition_point(|&s| s as usize <= k) - 1;
        format!("gene '{}', cell '{}'", genes[i[k] as usize], cells[c])
    };
    if let Some((k, n)) = bad(&|v: f64| v.is_finite()) {
        return invalid!("counts contain {n} NA/NaN/Inf value(s) (first at {}); counts must be finite", locate(k));
    }
    if let Some((k, n)) = bad(&|v: f64| v >= 0.0) {
        return invalid!(
            "counts contain {n} negative value(s) (first: {} at {}); counts must be >= 0",
            x[k],
            locate(k)
        );
    }
    if let Some((k, n)) = bad(&|v: f64| v.fract() == 0.0) {
        return invalid!(
            "counts contain {n} non-integer value(s) (first: {} at {}); pass raw counts, not normalized or log values",
            x[k],
            locate(k)
        );
    }
    if let Some((k, _)) = bad(&|v: f64| v <= MAX_EXACT_COUNT) {
        return invalid!("count {} at {} exceeds the supported maximum of 16,777,216", x[k], locate(k));
    }
    Ok(())
}

/// Columns of `have` holding `want` (by name, in that order); missing
/// ones are an error naming how many of the model's `what` genes are
/// missing and the first few.
pub fn columns_of(have: &[String], want: &[String], what: &str) -> crate::Result<Vec<usize>> {
    let at: HashMap<&str, usize> = have.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect();
    let missing: Vec<&String> = want.iter().filter(|g| !at.contains_key(g.as_str())).collect();
    if !missing.is_empty() {
        return invalid!(
            "{} of the model's {} {what}genes are missing from the new data (first: {}); \
             the new cells must be measured on the genes the model was trained on",
            missing.len(),
            want.len(),
            missing.iter().take(3).map(|g| format!("'{g}'")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(want.iter().map(|g| at[g.as_str()]).collect())
}

/// Up to three quoted names, for error messages.
pub(crate) fn quote_some<'a>(names: impl Iterator<Item = &'a String>) -> String {
    names.take(3).map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|k| format!("{prefix}{k}")).collect()
    }

    fn build(x: &[f64]) -> Result<CountMatrix> {
        // 3 genes × 2 cells: cell 0 = genes 0, 2; cell 1 = gene 1
        CountMatrix::from_csc_genes_by_cells(&[0, 2, 3], &[0, 2, 1], x, names("g", 3), names("c", 2))
    }

    #[test]
    fn csc_of_genes_is_csr_of_cells() {
        let m = build(&[1., 5., 2.]).unwrap();
        assert_eq!((m.n_cells(), m.n_genes()), (2, 3));
        assert_eq!(m.library_sizes(), vec![6., 2.]);
        let mut out = vec![0.0; 6];
        m.csr.dense_rows_into(&[0, 1], &mut out);
        assert_eq!(out, vec![1., 0., 5., 0., 2., 0.]);
    }

    #[test]
    fn own_columns_in_order_are_kept_without_a_copy() {
        let m = build(&[1., 5., 2.]).unwrap();
        let values = m.csr.values.as_ptr();
        let same = m.into_columns(&[0, 1, 2]);
        assert_eq!(same.values.as_ptr(), values);
        let m = build(&[1., 5., 2.]).unwrap();
        let swapped = m.into_columns(&[2, 0]);
        assert_eq!((swapped.n_cols, swapped.indices.clone(), swapped.values.clone()), (2, vec![0, 1], vec![5., 1.]));
    }

    #[test]
    fn a_matrix_is_checked_without_being_built() {
        let (g, c) = (names("g", 3), names("c", 2));
        assert!(CountMatrix::check_csc_genes_by_cells(&[0, 2, 3], &[0, 2, 1], &[1., 5., 2.], &g, &c).is_ok());
        let e = CountMatrix::check_csc_genes_by_cells(&[0, 2, 3], &[0, 2, 1], &[1., 5., 0.], &g, &c).unwrap_err();
        assert!(e.to_string().contains("1 cell(s) have zero total counts (first: 'c1')"), "{e}");
        let e = CountMatrix::check_csc_genes_by_cells(&[0, 2, 3], &[0, 2, 1], &[1., -5., 2.], &g, &c).unwrap_err();
        assert!(e.to_string().contains("negative"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = build(&[1., f64::NAN, 2.]).unwrap_err().to_string();
        assert!(e.contains("NA/NaN/Inf") && e.contains("gene 'g2', cell 'c0'"), "{e}");
        let e = build(&[1., 2., -1.]).unwrap_err().to_string();
        assert!(e.contains("negative") && e.contains("cell 'c1'"), "{e}");
        let e = build(&[1.5, 2., 1.]).unwrap_err().to_string();
        assert!(e.contains("non-integer") && e.contains("1.5"), "{e}");
    }

    #[test]
    fn empty_cells_and_duplicate_genes_are_refused() {
        let e = build(&[1., 5., 0.]).unwrap_err().to_string();
        assert!(e.contains("1 cell(s) have zero total counts") && e.contains("'c1'"), "{e}");
        let e = CountMatrix::from_csc_genes_by_cells(&[0, 1], &[0], &[1.], vec!["a".into(), "a".into()], names("c", 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicated") && e.contains("'a'"), "{e}");
        let e = CountMatrix::from_csc_genes_by_cells(&[0], &[], &[], names("g", 2), vec![]).unwrap_err().to_string();
        assert!(e.contains("no cells"), "{e}");
    }

    #[test]
    fn malformed_structure_is_refused() {
        let e = CountMatrix::from_csc_genes_by_cells(&[0, 2], &[1, 0], &[1., 1.], names("g", 2), names("c", 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsorted"), "{e}");
    }

    #[test]
    fn csc_slots_are_checked_for_structure_only() {
        // A cell without counts is allowed (a posterior draw may have none);
        // stored zeros are dropped; a malformed structure is refused.
        let m = csr_from_csc_slots(&[0, 2, 3], &[0, 2, 1], &[1., 5., 0.], 3).unwrap();
        assert_eq!((m.n_rows, m.n_cols), (2, 3));
        assert_eq!((m.indptr.clone(), m.indices.clone(), m.values.clone()), (vec![0, 2, 2], vec![0, 2], vec![1., 5.]));
        let e = csr_from_csc_slots(&[0, 2], &[1, 0], &[1., 1.], 2).unwrap_err().to_string();
        assert!(e.contains("unsorted"), "{e}");
        let e = csr_from_csc_slots(&[0, 1], &[3], &[1.], 3).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        assert!(csr_from_csc_slots(&[], &[], &[], 3).is_err());
    }

    #[test]
    fn select_genes_keeps_names() {
        let m = build(&[1., 5., 2.]).unwrap().select_genes(&[2, 1]);
        assert_eq!(m.genes, vec!["g2", "g1"]);
        assert_eq!(m.library_sizes(), vec![5., 2.]);
    }
}
