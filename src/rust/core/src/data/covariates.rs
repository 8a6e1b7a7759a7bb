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

/// Every covariate of the cells: the batch, further categorical covariates
/// and continuous ones. Models see them as one design vector per cell:
/// one-hot batch, one-hot of each further category, then continuous values.
#[derive(Debug, Clone)]
pub struct Covariates {
    pub batch: Categorical,
    pub categorical: Vec<Categorical>,
    pub continuous: Vec<(String, Vec<f32>)>,
}

impl Covariates {
    /// Checks that the continuous covariates are finite and sized right.
    pub fn new(
        batch: Categorical,
        categorical: Vec<Categorical>,
        continuous: Vec<(String, Vec<f32>)>,
    ) -> Result<Covariates> {
        let n = batch.codes.len();
        for c in &categorical {
            if c.codes.len() != n {
                return invalid!("`{}` has {} values for {n} cells", c.name, c.codes.len());
            }
        }
        for (name, v) in &continuous {
            if v.len() != n {
                return invalid!("`{name}` has {} values for {n} cells", v.len());
            }
            if let Some(k) = v.iter().position(|x| !x.is_finite()) {
                return invalid!("continuous covariate `{name}` is missing or infinite for cell {}", k + 1);
            }
        }
        Ok(Covariates { batch, categorical, continuous })
    }

    pub fn n_cells(&self) -> usize {
        self.batch.codes.len()
    }

    /// Width of the design vector.
    pub fn n_design(&self) -> usize {
        self.batch.n_levels() + self.categorical.iter().map(|c| c.n_levels()).sum::<usize>() + self.continuous.len()
    }

    /// Design rows `[rows, n_design]`; `batch_as` replaces every cell's batch
    /// by that level (counterfactual decoding).
    pub fn design(&self, rows: &[usize], batch_as: Option<u32>, device: Device) -> Tensor {
        let width = self.n_design();
        let mut buf = vec![0f32; rows.len() * width];
        for (k, &r) in rows.iter().enumerate() {
            let row = &mut buf[k * width..(k + 1) * width];
            row[batch_as.unwrap_or(self.batch.codes[r]) as usize] = 1.0;
            let mut offset = self.batch.n_levels();
            for c in &self.categorical {
                row[offset + c.codes[r] as usize] = 1.0;
                offset += c.n_levels();
            }
            for (j, (_, v)) in self.continuous.iter().enumerate() {
                row[offset + j] = v[r];
            }
        }
        Tensor::from_slice(&buf).view([rows.len() as i64, width as i64]).to_device(device)
    }

    /// Batch codes of `rows` as an int64 tensor (or all `batch_as`).
    pub fn batch_codes(&self, rows: &[usize], batch_as: Option<u32>, device: Device) -> Tensor {
        let codes: Vec<i64> = rows.iter().map(|&r| batch_as.unwrap_or(self.batch.codes[r]) as i64).collect();
        Tensor::from_slice(&codes).to_device(device)
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

    #[test]
    fn design_rows_concatenate_one_hots_and_values() {
        let b = Categorical::new("batch", vec![1, 0], vec!["a".into(), "b".into()], 2, 1).unwrap();
        let s = Categorical::new("sex", vec![0, 2], vec!["f".into(), "m".into(), "u".into()], 2, 0).unwrap();
        let cov = Covariates::new(b, vec![s], vec![("age".into(), vec![30.0, 41.5])]).unwrap();
        assert_eq!(cov.n_design(), 6);
        let d: Vec<f32> = Vec::try_from(cov.design(&[1, 0], None, Device::Cpu).flatten(0, -1)).unwrap();
        assert_eq!(d, vec![1., 0., 0., 0., 1., 41.5, 0., 1., 1., 0., 0., 30.]);
        let d: Vec<f32> = Vec::try_from(cov.design(&[1], Some(1), Device::Cpu).flatten(0, -1)).unwrap();
        assert_eq!(d, vec![0., 1., 0., 0., 1., 41.5]);
        let bad = Covariates::new(cov.batch.clone(), vec![], vec![("age".into(), vec![1.0, f32::NAN])]);
        assert!(bad.unwrap_err().to_string().contains("cell 2"));
    }
}
