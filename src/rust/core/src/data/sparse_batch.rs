//! A minibatch's counts kept sparse, for likelihoods summed per cell: the
//! rows' non-zeros on the host (what the fused CPU kernel reads) and, on
//! first use, as index tensors (what the tensor kernels read).

use super::csr::Csr;
use tch::{Device, Tensor};

/// The non-zero entries of a minibatch of counts, for likelihoods summed
/// per cell: most counts are zero, and the terms log Γ(x+θ) − log Γ(θ) and
/// x log μ vanish there, so they are evaluated at the non-zeros only.
///
/// On the CPU the entries are kept as host CSR rows (what the fused kernel
/// reads) and turned into index tensors only if the tensor path asks.
pub struct SparseBatch {
    pub n_rows: i64,
    n_cols: i64,
    device: Device,
    /// The entries as CSR rows in host memory (absent when the minibatch was
    /// gathered on a GPU).
    pub host: Option<HostRows>,
    tensors: std::cell::OnceCell<Entries>,
}

/// The non-zeros as tensors: row-major flat index (row · n_genes + gene),
/// gene, row and count of each.
struct Entries {
    flat: Tensor,
    gene: Tensor,
    row: Tensor,
    x: Tensor,
}

/// A minibatch's counts as CSR rows in host memory.
pub struct HostRows {
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

impl SparseBatch {
    /// Rows `rows` of `m` on `device`.
    pub fn from_csr(m: &Csr, rows: &[usize], device: Device) -> SparseBatch {
        let nnz: usize = rows.iter().map(|&r| m.indptr[r + 1] - m.indptr[r]).sum();
        let (mut indptr, mut indices, mut values) =
            (Vec::with_capacity(rows.len() + 1), Vec::with_capacity(nnz), Vec::with_capacity(nnz));
        indptr.push(0);
        for &r in rows {
            let (idx, val) = m.row(r);
            indices.extend_from_slice(idx);
            values.extend_from_slice(val);
            indptr.push(values.len());
        }
        let sb = SparseBatch {
            n_rows: rows.len() as i64,
            n_cols: m.n_cols as i64,
            device,
            host: Some(HostRows { indptr, indices, values }),
            tensors: std::cell::OnceCell::new(),
        };
        if device != Device::Cpu {
            // Off the CPU only the tensors are used: build them now, drop the host copy.
            sb.entries();
            return SparseBatch { host: None, ..sb };
        }
        sb
    }

    /// A batch from its non-zeros already in tensors (see `Entries`).
    pub fn from_tensors(
        flat: Tensor,
        gene: Tensor,
        row: Tensor,
        x: Tensor,
        n_rows: i64,
        host: Option<HostRows>,
    ) -> Self {
        let device = x.device();
        let tensors = std::cell::OnceCell::new();
        let _ = tensors.set(Entries { flat, gene, row, x });
        SparseBatch { n_rows, n_cols: 0, device, host, tensors }
    }

    fn entries(&self) -> &Entries {
        self.tensors.get_or_init(|| {
            let h = self.host.as_ref().expect("a batch without tensors has host rows");
            let nnz = h.values.len();
            let (mut flat, mut row) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz));
            for k in 0..h.indptr.len() - 1 {
                for &j in &h.indices[h.indptr[k]..h.indptr[k + 1]] {
                    flat.push(k as i64 * self.n_cols + j as i64);
                    row.push(k as i64);
                }
            }
            let gene: Vec<i64> = h.indices.iter().map(|&j| j as i64).collect();
            let t = |v: &[i64]| Tensor::from_slice(v).to_device(self.device);
            Entries {
                flat: t(&flat),
                gene: t(&gene),
                row: t(&row),
                x: Tensor::from_slice(&h.values).to_device(self.device),
            }
        })
    }

    /// Flat row-major index of each non-zero.
    pub fn flat(&self) -> &Tensor {
        &self.entries().flat
    }

    /// Gene (column) of each non-zero.
    pub fn gene(&self) -> &Tensor {
        &self.entries().gene
    }

    /// Row of each non-zero.
    pub fn row(&self) -> &Tensor {
        &self.entries().row
    }

    /// The non-zero counts.
    pub fn x(&self) -> &Tensor {
        &self.entries().x
    }

    /// Values of a [rows, genes] tensor (or a [1, genes] one, broadcast) at the non-zeros.
    pub(crate) fn at(&self, t: &Tensor) -> Tensor {
        if t.size()[0] == 1 && self.n_rows != 1 {
            t.reshape([-1]).index_select(0, self.gene())
        } else {
            t.reshape([-1]).index_select(0, self.flat())
        }
    }

    /// Sums per-non-zero values into one value per row.
    pub(crate) fn per_row(&self, v: &Tensor) -> Tensor {
        Tensor::zeros([self.n_rows], (v.kind(), v.device())).index_add(0, self.row(), v)
    }
}
