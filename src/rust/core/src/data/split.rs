//! Train/validation split and minibatches cut from CSR straight into tensors.

use super::csr::Csr;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

/// Shuffles cells `0..n` with `seed` and holds out `ceil(validation_fraction · n)`
/// of them (none when the fraction is 0). Returns (train, validation), each sorted.
pub fn train_validation_split(n: usize, validation_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_val = ((validation_fraction * n as f64).ceil() as usize).min(n.saturating_sub(1));
    let (val, train) = order.split_at(n_val);
    let (mut train, mut val) = (train.to_vec(), val.to_vec());
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Dense `[rows.len(), n_cols]` float tensor of the given rows, on `device`.
/// Only these rows are ever densified.
pub fn rows_to_tensor(m: &Csr, rows: &[usize], device: Device) -> Tensor {
    rows_to_tensor_with(m, rows, device, Csr::dense_rows_into)
}

/// `rows_to_tensor` of log(1 + value), the encoders' input.
pub fn log1p_rows_to_tensor(m: &Csr, rows: &[usize], device: Device) -> Tensor {
    rows_to_tensor_with(m, rows, device, Csr::dense_log1p_rows_into)
}

fn rows_to_tensor_with(m: &Csr, rows: &[usize], device: Device, fill: fn(&Csr, &[usize], &mut [f32])) -> Tensor {
    let t = Tensor::empty([rows.len() as i64, m.n_cols as i64], (tch::Kind::Float, Device::Cpu));
    if rows.is_empty() || m.n_cols == 0 {
        return t.to_device(device);
    }
    // SAFETY: a fresh contiguous f32 tensor of exactly this many elements.
    let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, rows.len() * m.n_cols) };
    fill(m, rows, buf);
    if device == Device::Cpu {
        t
    } else {
        // `_pin_memory`: libtorch 2.11's `pin_memory` warns on every call
        // that its device argument (which tch always passes) is deprecated.
        t.internal_pin_memory(device).to_device_(device, tch::Kind::Float, true, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_a_seeded_partition() {
        let (t, v) = train_validation_split(100, 0.1, 7);
        assert_eq!((t.len(), v.len()), (90, 10));
        let mut all: Vec<usize> = t.iter().chain(&v).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(train_validation_split(100, 0.1, 7), (t, v.clone()));
        assert_ne!(train_validation_split(100, 0.1, 8).1, v);
    }

    #[test]
    fn tensor_rows_equal_csr_rows() {
        let m = Csr { n_rows: 2, n_cols: 3, indptr: vec![0, 1, 3], indices: vec![1, 0, 2], values: vec![4., 5., 6.] };
        let t = rows_to_tensor(&m, &[1, 0, 1], Device::Cpu);
        assert_eq!(t.size(), vec![3, 3]);
        let v: Vec<f32> = Vec::try_from(t.flatten(0, -1)).unwrap();
        assert_eq!(v, vec![5., 0., 6., 0., 4., 0., 5., 0., 6.]);
    }

    #[test]
    fn log1p_rows_equal_log1p_of_the_dense_rows() {
        // Whole numbers inside and beyond the lookup table, and fractions.
        let values = vec![1., 3., 4095., 4096., 1e6, 0.25, 2.5, 7.];
        let m = Csr { n_rows: 2, n_cols: 5, indptr: vec![0, 4, 8], indices: vec![0, 1, 2, 4, 0, 1, 3, 4], values };
        let rows = [1, 0];
        let want = rows_to_tensor(&m, &rows, Device::Cpu).to_kind(tch::Kind::Double).log1p();
        let got = log1p_rows_to_tensor(&m, &rows, Device::Cpu);
        assert_eq!(got.size(), vec![2, 5]);
        let err = (got.to_kind(tch::Kind::Double) - &want).abs() / (want.abs() + 1e-30);
        assert!(err.max().double_value(&[]) < 1e-7, "relative error {err:?}");
        let zeros: Vec<f32> = Vec::try_from(got.flatten(0, -1)).unwrap();
        assert_eq!((zeros[2], zeros[8]), (0.0, 0.0));
    }

    #[test]
    fn wide_minibatches_are_written_in_parallel_blocks_to_the_same_result() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        // A 70 × 4,001 minibatch: above the size written by the OpenMP team,
        // with an uneven last block, rows repeated and out of order.
        let (n, g) = (40usize, 4001usize);
        let (mut indptr, mut indices, mut values) = (vec![0], vec![], vec![]);
        for r in 0..n {
            for j in (r % 7..g).step_by(5 + r % 3) {
                indices.push(j as u32);
                values.push(((r * 31 + j) % 50) as f32);
            }
            indptr.push(indices.len());
        }
        let m = Csr { n_rows: n, n_cols: g, indptr, indices, values };
        let rows: Vec<usize> = (0..70).map(|k| (k * 17) % n).collect();
        let mut serial = vec![0f32; rows.len() * g];
        for (k, &r) in rows.iter().enumerate() {
            m.dense_log1p_rows_into(&[r], &mut serial[k * g..(k + 1) * g]);
        }
        for threads in [1, 2, 3] {
            tch::set_num_threads(threads);
            let got: Vec<f32> = Vec::try_from(log1p_rows_to_tensor(&m, &rows, Device::Cpu).flatten(0, -1)).unwrap();
            assert!(got == serial, "{threads} threads");
        }
        tch::set_num_threads(2);
    }
}
