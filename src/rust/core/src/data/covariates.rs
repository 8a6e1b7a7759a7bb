//! Cell covariates: categorical (batch, sample, condition) and continuous.

use super::counts::quote_some;
use crate::error::{invalid, Result};
use tch::{Device, Kind, Tensor};

/// A categorical covariate as integer codes into `levels`.
#[derive(Debug, Clone, PartialEq)]
pub struct Categorical {
    pub name: String,
    pub codes: Vec<u32>,
    pub levels: Vec<String>,
}

impl Categorical {
    /// Checks that every code names a level and that every level has at least
    /// `min_cells` cells (a batch of one cell has no variance to model).
    pub fn new(name: &str, codes: Vec<u32>, levels: Vec<String>, n_cells: usize, min_cells: usize) -> Result<Self> {
        if codes.len() != n_cells {
            return invalid!("`{name}` has {} values for {n_cells} cells", codes.len());
        }
        if levels.is_empty() {
            return invalid!("`{name}` has no levels");
        }
        if let Some(&c) = codes.iter().find(|&&c| c as usize >= levels.len()) {
            return invalid!("`{name}` has code {c} but only {} levels", levels.len());
        }
        let cat = Categorical { name: name.to_string(), codes, levels };
        let sizes = cat.level_sizes();
        let small: Vec<&String> =
            cat.levels.iter().zip(&sizes).filter(|(_, &s)| s < min_cells).map(|(l, _)| l).collect();
        if !small.is_empty() {
            return invalid!(
                "{} level(s) of `{name}` have fewer than {min_cells} cells (first: {}); merge or drop them",
                small.len(),
                quote_some(small.into_iter())
            );
        }
        Ok(cat)
    }

    /// A covariate with a single level (no batch given).
    pub fn constant(name: &str, n_cells: usize) -> Self {
        Categorical { name: name.to_string(), codes: vec![0; n_cells], levels: vec!["all".to_string()] }
    }

    pub fn n_levels(&self) -> usize {
        self.levels.len()
    }

    /// Number of cells in each level.
    pub fn level_sizes(&self) -> Vec<usize> {
        let mut sizes = vec![0; self.levels.len()];
        for &c in &self.codes {
            sizes[c as usize] += 1;
        }
        sizes
    }

    /// Cell indices of each level.
    pub fn cells_by_level(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.levels.len()];
        for (cell, &c) in self.codes.iter().enumerate() {
            out[c as usize].push(cell);
        }
        out
    }

    /// One-hot encoding of `rows`: [rows, levels].
    pub fn one_hot(&self, rows: &[usize], device: Device) -> Tensor {
        let codes: Vec<i64> = rows.iter().map(|&r| self.codes[r] as i64).collect();
        Tensor::from_slice(&codes).to_device(device).one_hot(self.levels.len() as i64).to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_with_one_cell_are_refused() {
        let e = Categorical::new("batch", vec![0, 0, 1], vec!["a".into(), "b".into()], 3, 2).unwrap_err();
        assert!(e.to_string().contains("fewer than 2 cells (first: 'b')"), "{e}");
        let e = Categorical::new("batch", vec![0, 3], vec!["a".into()], 2, 1).unwrap_err();
        assert!(e.to_string().contains("code 3"), "{e}");
    }

    #[test]
    fn one_hot_matches_codes() {
        let b = Categorical::new("batch", vec![1, 0, 1], vec!["a".into(), "b".into()], 3, 1).unwrap();
        let t = b.one_hot(&[2, 1], Device::Cpu);
        assert_eq!(t.size(), vec![2, 2]);
        assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(), vec![0., 1., 1., 0.]);
        assert_eq!(b.cells_by_level(), vec![vec![1], vec![0, 2]]);
    }
}
