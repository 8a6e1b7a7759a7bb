//! A cells × dimensions embedding as stored: one cell after another
//! (row-major, the core's own matrices) or one dimension after another (an
//! R matrix, read in place without a reordered copy). Harmony reads both;
//! the metrics need row-major and say so.

/// An embedding of `n` cells in `d` dimensions.
#[derive(Debug, Clone, Copy)]
pub struct Embedding<'a> {
    pub values: &'a [f64],
    pub n: usize,
    pub d: usize,
    pub column_major: bool,
}

impl<'a> Embedding<'a> {
    pub fn row_major(values: &'a [f64], n: usize, d: usize) -> Self {
        Embedding { values, n, d, column_major: false }
    }

    pub fn column_major(values: &'a [f64], n: usize, d: usize) -> Self {
        Embedding { values, n, d, column_major: true }
    }

    /// (cell, dimension) of the value at `pos` of `values`, 0-based.
    pub fn at(&self, pos: usize) -> (usize, usize) {
        if self.column_major {
            (pos % self.n, pos / self.n)
        } else {
            (pos / self.d, pos % self.d)
        }
    }

    /// The value of cell `i` in dimension `j`, in either layout.
    #[inline]
    pub fn get(&self, i: usize, j: usize) -> f64 {
        if self.column_major {
            self.values[j * self.n + i]
        } else {
            self.values[i * self.d + j]
        }
    }

    /// Cell `i`'s coordinates copied into `out` (d values), in either layout.
    pub fn row_into(&self, i: usize, out: &mut [f64]) {
        out.iter_mut().enumerate().for_each(|(j, v)| *v = self.get(i, j));
    }

    /// Cell `i`'s coordinates; the embedding must be row-major.
    pub fn row(&self, i: usize) -> &'a [f64] {
        debug_assert!(!self.column_major, "row() of a column-major embedding");
        &self.values[i * self.d..(i + 1) * self.d]
    }
}
