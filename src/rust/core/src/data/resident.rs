//! The count matrix held on the device (a GPU) as CSR tensors, with
//! minibatches gathered there: no host-to-device copy of counts per step.
//! Written with libtorch ops only, so the same code runs (and is tested) on
//! the CPU.

use super::csr::Csr;
use super::sparse_batch::{HostRows, SparseBatch};
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// CSR of cells × genes as tensors on one device.
pub struct DeviceCsr {
    indptr: Tensor,
    indices: Tensor,
    values: Tensor,
    n_cols: i64,
}

impl DeviceCsr {
    /// Bytes a matrix with `nnz` stored values takes on the device.
    pub fn bytes(nnz: usize, n_rows: usize) -> usize {
        12 * nnz + 8 * (n_rows + 1)
    }

    pub fn new(m: &Csr, device: Device) -> Result<DeviceCsr> {
        let indptr: Vec<i64> = m.indptr.iter().map(|&p| p as i64).collect();
        let indices: Vec<i64> = m.indices.iter().map(|&j| j as i64).collect();
        Ok(DeviceCsr {
            indptr: Tensor::f_from_slice(&indptr)?.to_device(device),
            indices: Tensor::f_from_slice(&indices)?.to_device(device),
            values: Tensor::f_from_slice(&m.values)?.to_device(device),
            n_cols: m.n_cols as i64,
        })
    }

    pub fn device(&self) -> Device {
        self.values.device()
    }

    /// Rows `rows` as a dense `[rows, genes]` tensor and as their non-zeros.
    pub fn rows(&self, rows: &[usize]) -> (Tensor, SparseBatch) {
        let device = self.device();
        let b = rows.len() as i64;
        let r = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(device);
        let start = self.indptr.index_select(0, &r);
        let lens = self.indptr.index_select(0, &(&r + 1)) - &start;
        let total = lens.sum(Kind::Int64).int64_value(&[]);
        let row = Tensor::arange(b, (Kind::Int64, device)).repeat_interleave_self_tensor(&lens, 0, Some(total));
        // Position of each entry: its row's start plus its rank within the row.
        let first = (lens.cumsum(0, Kind::Int64) - &lens).index_select(0, &row);
        let pos = Tensor::arange(total, (Kind::Int64, device)) - first + start.index_select(0, &row);
        let gene = self.indices.index_select(0, &pos);
        let x = self.values.index_select(0, &pos);
        let flat = &row * self.n_cols + &gene;
        let dense = Tensor::zeros([b * self.n_cols], (Kind::Float, device)).index_put(&[Some(&flat)], &x, false);
        // On the CPU the fused likelihood kernel reads the same entries as CSR rows.
        let host = (device == Device::Cpu).then(|| {
            let lens = Vec::<i64>::try_from(&lens).expect("row lengths");
            let mut indptr = vec![0usize];
            indptr.extend(lens.iter().scan(0usize, |acc, &l| {
                *acc += l as usize;
                Some(*acc)
            }));
            let indices = Vec::<i64>::try_from(&gene).expect("gene indices").into_iter().map(|j| j as u32).collect();
            HostRows { indptr, indices, values: Vec::<f32>::try_from(&x).expect("counts") }
        });
        (dense.view([b, self.n_cols]), SparseBatch::from_tensors(flat, gene, row, x, b, host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_rows_equal_the_host_path() {
        // 4 cells x 3 genes, 1 to 3 non-zeros per cell; rows picked out of order and twice.
        let m = Csr {
            n_rows: 4,
            n_cols: 3,
            indptr: vec![0, 2, 3, 6, 7],
            indices: vec![0, 2, 1, 0, 1, 2, 2],
            values: vec![1., 2., 3., 4., 5., 6., 7.],
        };
        let d = DeviceCsr::new(&m, Device::Cpu).unwrap();
        let rows = [3usize, 0, 2, 0];
        let (dense, sb) = d.rows(&rows);
        let host = crate::data::rows_to_tensor(&m, &rows, Device::Cpu);
        assert!(dense.equal(&host));
        let hb = SparseBatch::from_csr(&m, &rows, Device::Cpu);
        assert!(
            sb.flat().equal(hb.flat())
                && sb.gene().equal(hb.gene())
                && sb.row().equal(hb.row())
                && sb.x().equal(hb.x())
        );
        assert_eq!(sb.n_rows, 4);
        let (a, b) = (sb.host.as_ref().unwrap(), hb.host.as_ref().unwrap());
        assert!(a.indptr == b.indptr && a.indices == b.indices && a.values == b.values);
    }
}
