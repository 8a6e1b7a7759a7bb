//! An encoder's first layer fed straight from the minibatch's sparse counts.
//!
//! The first layer multiplies log(1 + counts) [cells × features] by its
//! weight. An ATAC minibatch is about a tenth non-zero, so the dense product
//! and its weight gradient do ten times the work needed (and need the dense
//! minibatch written out first). Here the weight is kept transposed,
//! Wᵀ [features × units], so that each non-zero meets one contiguous row:
//!   out[c, :] = Σ_f x[c, f] · Wᵀ[f, :]        (forward)
//!   ∂Wᵀ[f, :] = Σ_c x[c, f] · ∂out[c, :]      (weight gradient)
//! The forward pass walks the minibatch's rows within blocks of features
//! whose rows of Wᵀ fit in cache; the gradient walks it by feature, each
//! row of ∂Wᵀ summed in registers and written once. On an ATAC minibatch
//! (128 cells × 20,000 peaks, 12% non-zero, 128 units) the two take about a
//! quarter of the two dense products' time.
//!
//! libtorch's autograd cannot run a backward written here, so the product
//! enters the graph as a leaf. After `backward()`, `Deferred::gradient` reads
//! the leaf's gradient and returns the weight's; the training loop hands it
//! to the optimizer with the others.

use crate::data::{log1p_count, log1p_table, Categorical, Csr};
use std::cell::OnceCell;
use std::rc::Rc;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// Lanes summed in registers at once: four AVX-512 vectors, so that four
/// independent chains of fused multiply-adds hide each one's latency.
const LANES: usize = 64;
/// Bytes of the weight's rows the forward pass keeps hot at a time (half a
/// typical 1 MB L2 cache).
const BLOCK_BYTES: usize = 1 << 18;

/// A minibatch's encoder input: log(1 + x) of the chosen rows (columns
/// ascending within each, as in `Csr`), with the covariates' one-hot columns
/// after the features. The same entries by column are built on first use
/// (by the weight gradient).
pub struct SparseInput {
    /// The minibatch's rows: one `Csr` row per chosen cell.
    pub rows: Csr,
    by_column: OnceCell<Columns>,
}

/// The entries by column: for column j, `colptr[j]..colptr[j + 1]`.
struct Columns {
    colptr: Vec<usize>,
    rows: Vec<u32>,
    values: Vec<f32>,
}

/// (pointer, length) of a buffer written by several OpenMP threads, each in
/// its own range.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T, usize);
// SAFETY: only used for disjoint ranges while the owner is alive (see uses).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// SAFETY: `range` must be inside the buffer, and the slice used by no
    /// one else and not beyond the buffer's life.
    unsafe fn part<'a>(self, range: std::ops::Range<usize>) -> &'a mut [T] {
        debug_assert!(range.end <= self.1);
        unsafe { std::slice::from_raw_parts_mut(self.0.add(range.start), range.len()) }
    }
}

fn threads() -> usize {
    tch::get_num_threads().max(1) as usize
}

impl SparseInput {
    /// log(1 + x) of rows `rows` of `m`, followed by the one-hot columns of
    /// each of `cats` in turn: the encoder's input with its covariates
    /// concatenated.
    pub fn log1p_rows(m: &Csr, rows: &[usize], cats: &[Categorical]) -> SparseInput {
        Self::log1p_rows_at(m, rows, rows, cats)
    }

    /// `log1p_rows` where the matrix's rows `local` are the cells `cells`
    /// of the covariates (rows read from disk into a matrix of their own).
    pub fn log1p_rows_at(m: &Csr, local: &[usize], cells: &[usize], cats: &[Categorical]) -> SparseInput {
        debug_assert_eq!(local.len(), cells.len());
        let n_cols = m.n_cols + cats.iter().map(|c| c.n_levels()).sum::<usize>();
        let nnz = local.iter().map(|&r| m.indptr[r + 1] - m.indptr[r]).sum::<usize>() + local.len() * cats.len();
        let (mut indptr, mut indices, mut values) =
            (Vec::with_capacity(local.len() + 1), Vec::with_capacity(nnz), Vec::with_capacity(nnz));
        indptr.push(0);
        let table = log1p_table();
        for (&r, &cell) in local.iter().zip(cells) {
            let (idx, val) = m.row(r);
            indices.extend_from_slice(idx);
            values.extend(val.iter().map(|&v| log1p_count(v, table)));
            let mut offset = m.n_cols;
            for c in cats {
                indices.push((offset + c.codes[cell] as usize) as u32);
                values.push(1.0);
                offset += c.n_levels();
            }
            indptr.push(values.len());
        }
        let rows = Csr { n_rows: local.len(), n_cols, indptr, indices, values };
        SparseInput { rows, by_column: OnceCell::new() }
    }

    pub fn nnz(&self) -> usize {
        self.rows.nnz()
    }

    /// The dense [rows, columns] matrix on `device`.
    pub fn to_dense(&self, device: Device) -> Tensor {
        crate::data::rows_to_tensor(&self.rows, &(0..self.rows.n_rows).collect::<Vec<_>>(), device)
    }

    /// `parts` ranges of columns of about equal numbers of entries, given
    /// the number of entries before each column (`colptr`, or None for ranges
    /// of equal width).
    fn column_parts(n_cols: usize, colptr: Option<&[usize]>, parts: usize) -> Vec<(usize, usize)> {
        let parts = parts.clamp(1, n_cols.max(1));
        let mut bounds = vec![0usize];
        for p in 1..parts {
            let j = match colptr {
                Some(c) => c.partition_point(|&v| v < c[n_cols] * p / parts).min(n_cols),
                None => n_cols * p / parts,
            };
            bounds.push(j.max(*bounds.last().expect("non-empty")));
        }
        bounds.push(n_cols);
        bounds.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// out = X · Wᵀ for `wt` [columns × width], `out` [rows × width]. The
    /// columns are shared out among `threads` OpenMP threads, each summing
    /// into its own copy of `out`, added in a fixed order. Each thread goes
    /// through its columns in blocks whose rows of Wᵀ fit in cache, and for
    /// each row of X sums its entries in the block in registers.
    pub fn matmul(&self, wt: &[f32], width: usize, out: &mut [f32], threads: usize) {
        assert_eq!(wt.len(), self.rows.n_cols * width, "weight shape");
        assert_eq!(out.len(), self.rows.n_rows * width, "output shape");
        let parts = Self::column_parts(self.rows.n_cols, None, threads);
        let partial: Vec<Mutex<Vec<f32>>> = (0..parts.len()).map(|_| Mutex::new(Vec::new())).collect();
        let block = (BLOCK_BYTES / (4 * width.max(1))).max(16);
        let Csr { n_rows, indptr, indices, values, .. } = &self.rows;
        let n_rows = *n_rows;
        let out_len = out.len();
        super::omp::run(parts.len(), &|member, members| {
            for p in (member..parts.len()).step_by(members) {
                let (lo, hi) = parts[p];
                let mut acc = vec![0f32; out_len];
                // Where each row's entries at or after column `lo` start.
                let mut cursor: Vec<usize> = (0..n_rows)
                    .map(|r| indptr[r] + indices[indptr[r]..indptr[r + 1]].partition_point(|&j| (j as usize) < lo))
                    .collect();
                for b0 in (lo..hi).step_by(block) {
                    let b1 = (b0 + block).min(hi);
                    // Read the block's rows of Wᵀ in order first: a stream the
                    // hardware prefetches, where the rows' first touches below
                    // come in random order, each waiting on memory.
                    touch(&wt[b0 * width..b1 * width]);
                    for (r, at) in cursor.iter_mut().enumerate() {
                        let a = *at;
                        let n = indices[a..indptr[r + 1]].partition_point(|&j| (j as usize) < b1);
                        let row = &mut acc[r * width..(r + 1) * width];
                        row_times_block(&indices[a..a + n], &values[a..a + n], wt, width, row);
                        *at = a + n;
                    }
                }
                *partial[p].lock().unwrap_or_else(|e| e.into_inner()) = acc;
            }
        });
        out.fill(0.0);
        for p in partial {
            let p = p.into_inner().unwrap_or_else(|e| e.into_inner());
            out.iter_mut().zip(p.iter()).for_each(|(o, v)| *o += v);
        }
    }

    /// The entries by column, built on first call: each of `threads` OpenMP
    /// threads sorts the entries of its own range of columns.
    fn columns(&self, threads: usize) -> &Columns {
        self.by_column.get_or_init(|| {
            let nnz = self.nnz();
            let mut colptr = vec![0usize; self.rows.n_cols + 1];
            for &j in &self.rows.indices {
                colptr[j as usize + 1] += 1;
            }
            for j in 0..self.rows.n_cols {
                colptr[j + 1] += colptr[j];
            }
            let (mut rows, mut values) = (vec![0u32; nnz], vec![0f32; nnz]);
            let parts = Self::column_parts(self.rows.n_cols, Some(&colptr), threads);
            let (rs, vs) = (Shared(rows.as_mut_ptr(), nnz), Shared(values.as_mut_ptr(), nnz));
            let Csr { indptr, indices, values: vals, .. } = &self.rows;
            let colptr_ref = &colptr;
            super::omp::run(parts.len(), &|member, members| {
                for &(lo, hi) in parts.iter().skip(member).step_by(members) {
                    let base = colptr_ref[lo];
                    // SAFETY: the entries of columns lo..hi fill exactly
                    // colptr[lo]..colptr[hi], a range no other part touches.
                    let (rows, values) = unsafe { (rs.part(base..colptr_ref[hi]), vs.part(base..colptr_ref[hi])) };
                    let mut next: Vec<usize> = colptr_ref[lo..hi].iter().map(|&c| c - base).collect();
                    for r in 0..indptr.len() - 1 {
                        let (a, b) = (indptr[r], indptr[r + 1]);
                        let from = a + indices[a..b].partition_point(|&j| (j as usize) < lo);
                        for k in from..b {
                            let j = indices[k] as usize;
                            if j >= hi {
                                break;
                            }
                            let at = &mut next[j - lo];
                            rows[*at] = r as u32;
                            values[*at] = vals[k];
                            *at += 1;
                        }
                    }
                }
            });
            Columns { colptr, rows, values }
        })
    }

    /// ∂Wᵀ = Xᵀ · G for `g` [rows × width], into `dwt` [columns × width]
    /// (every row written; the columns shared out among `threads`).
    pub fn matmul_t(&self, g: &[f32], width: usize, dwt: &mut [f32], threads: usize) {
        assert_eq!(g.len(), self.rows.n_rows * width, "gradient shape");
        assert_eq!(dwt.len(), self.rows.n_cols * width, "weight shape");
        let c = self.columns(threads);
        let parts = Self::column_parts(self.rows.n_cols, Some(&c.colptr), threads);
        let d = Shared(dwt.as_mut_ptr(), dwt.len());
        super::omp::run(parts.len(), &|member, members| {
            for &(lo, hi) in parts.iter().skip(member).step_by(members) {
                // SAFETY: rows lo..hi of ∂Wᵀ belong to this part alone.
                let d = unsafe { d.part(lo * width..hi * width) };
                columns_times_g(&c.colptr[lo..=hi], &c.rows, &c.values, g, width, d);
            }
        });
    }
}

/// Reads one value per cache line of `v`, bringing it into cache.
fn touch(v: &[f32]) {
    let mut s = 0f32;
    for x in v.iter().step_by(16) {
        s += x;
    }
    std::hint::black_box(s);
}

/// Σ v · m[k, c0..c0 + N] over the entries (k, v), summed in registers.
#[inline(always)]
fn lanes<const N: usize, const FMA: bool>(
    keys: &[u32],
    values: &[f32],
    m: &[f32],
    width: usize,
    c0: usize,
) -> [f32; N] {
    let mut acc = [0f32; N];
    for (&k, &v) in keys.iter().zip(values) {
        let x: &[f32; N] = m[k as usize * width + c0..][..N].try_into().expect("N lanes");
        for l in 0..N {
            acc[l] = super::simd::madd::<FMA>(v, x[l], acc[l]);
        }
    }
    acc
}

/// Calls `put(c0, sums)` for consecutive lane ranges covering 0..width,
/// where sums = Σ v · m[k, c0..] over the entries (k, v): `LANES` lanes at
/// a time, then 16, then one.
#[inline(always)]
fn sum_rows<const FMA: bool>(
    keys: &[u32],
    values: &[f32],
    m: &[f32],
    width: usize,
    mut put: impl FnMut(usize, &[f32]),
) {
    let mut c0 = 0;
    while c0 + LANES <= width {
        put(c0, &lanes::<LANES, FMA>(keys, values, m, width, c0));
        c0 += LANES;
    }
    while c0 + 16 <= width {
        put(c0, &lanes::<16, FMA>(keys, values, m, width, c0));
        c0 += 16;
    }
    while c0 < width {
        put(c0, &lanes::<1, FMA>(keys, values, m, width, c0));
        c0 += 1;
    }
}

/// row += Σ v · wt[j, :] over the entries (j, v).
#[inline(always)]
fn row_times_block_body<const FMA: bool>(indices: &[u32], values: &[f32], wt: &[f32], width: usize, row: &mut [f32]) {
    sum_rows::<FMA>(indices, values, wt, width, |c0, s| {
        row[c0..c0 + s.len()].iter_mut().zip(s).for_each(|(o, a)| *o += a);
    });
}

crate::kernels::simd::wide_copies! {
    fn row_times_block(indices: &[u32], values: &[f32], wt: &[f32], width: usize, row: &mut [f32]) = fma row_times_block_body
}

/// d[j, :] = Σ v · g[r, :] over the entries (r, v) of each column j of
/// `colptr` (absolute offsets into `rows` and `values`).
#[inline(always)]
fn columns_times_g_body<const FMA: bool>(
    colptr: &[usize],
    rows: &[u32],
    values: &[f32],
    g: &[f32],
    width: usize,
    d: &mut [f32],
) {
    for j in 0..colptr.len() - 1 {
        let (rs, vs) = (&rows[colptr[j]..colptr[j + 1]], &values[colptr[j]..colptr[j + 1]]);
        let out = &mut d[j * width..(j + 1) * width];
        sum_rows::<FMA>(rs, vs, g, width, |c0, s| out[c0..c0 + s.len()].copy_from_slice(s));
    }
}

crate::kernels::simd::wide_copies! {
    fn columns_times_g(colptr: &[usize], rows: &[u32], values: &[f32], g: &[f32], width: usize, d: &mut [f32]) = fma columns_times_g_body
}

/// A weight whose gradient is computed after `backward()`: the product
/// `output` = X · Wᵀ entered the graph as a leaf.
pub struct Deferred {
    weight: Tensor,
    input: DeferredInput,
    output: Tensor,
    buffer: GradBuffer,
}

/// What the deferred product read.
enum DeferredInput {
    /// A sparse input and a transposed f32 weight ([`linear_t`]).
    Sparse(Rc<SparseInput>),
    /// A dense bf16 input [rows, in] and the bf16 shadow of a weight
    /// [out, in] that the optimiser keeps ([`linear_bf16_deferred`]).
    Bf16 { input: Tensor, shadow: Tensor },
}

/// Where a deferred layer keeps its weight's gradient between steps (the
/// optimizer reads it within the step; a fresh 10 MB tensor per step costs
/// more in page faults than the product written into it).
pub type GradBuffer = std::sync::Arc<Mutex<Option<Tensor>>>;

impl Deferred {
    /// The weight and its gradient Xᵀ · ∂output (f32 for a sparse input,
    /// bf16 for a bf16 one); None when the output got no gradient (it did
    /// not reach the loss). The gradient lives in the layer's buffer: valid
    /// until the layer's next `gradient`.
    pub fn gradient(&self) -> Option<(Tensor, Tensor)> {
        let g = self.output.grad();
        if !g.defined() {
            return None;
        }
        let kind = match self.input {
            DeferredInput::Sparse(_) => Kind::Float,
            DeferredInput::Bf16 { .. } => Kind::BFloat16,
        };
        let kept = self
            .buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|t| t.size() == self.weight.size() && t.kind() == kind);
        let d = kept.unwrap_or_else(|| Tensor::empty(self.weight.size(), (kind, Device::Cpu)));
        match &self.input {
            DeferredInput::Sparse(input) => {
                let g = g.contiguous();
                let width = self.weight.size()[1] as usize;
                // SAFETY: `g` is a contiguous f32 [rows, width] tensor and `d` a
                // contiguous f32 tensor of the weight's shape; neither is aliased.
                let (gs, ds) = unsafe {
                    (
                        std::slice::from_raw_parts(g.data_ptr() as *const f32, g.numel()),
                        std::slice::from_raw_parts_mut(d.data_ptr() as *mut f32, d.numel()),
                    )
                };
                input.matmul_t(gs, width, ds, threads());
            }
            // ∂W = ∂outputᵀ · X in bf16 with f32 accumulation: the product
            // libtorch's autograd makes for a bf16 linear layer.
            DeferredInput::Bf16 { input, .. } => {
                tch::no_grad(|| {
                    let _ = g.to_kind(Kind::BFloat16).tr().mm_out(&d, input);
                });
            }
        }
        *self.buffer.lock().unwrap_or_else(|e| e.into_inner()) = Some(d.shallow_clone());
        Some((self.weight.shallow_clone(), d))
    }

    /// The weight and the bf16 shadow its product read, which the optimiser
    /// rewrites when it updates the weight; None for a sparse input.
    pub fn shadow(&self) -> Option<(Tensor, Tensor)> {
        match &self.input {
            DeferredInput::Bf16 { shadow, .. } => Some((self.weight.shallow_clone(), shadow.shallow_clone())),
            DeferredInput::Sparse(_) => None,
        }
    }
}

/// X · Wᵀ + b with X a dense bf16 input [rows, in] (already what the layer
/// reads, covariates included) and `shadow` the bf16 copy of the f32
/// weight `w` [out, in]: mixed precision as [`crate::nn::linear_bf16`],
/// without casting the weight or the input at each step. When autograd
/// is recording, the product is a leaf and the `Deferred` returned with it
/// turns its gradient into the weight's (in bf16, read by the optimiser,
/// which also rewrites `shadow`).
pub fn linear_bf16_deferred(
    x: &Tensor,
    w: &Tensor,
    shadow: &Tensor,
    bs: Option<&Tensor>,
    buffer: &GradBuffer,
) -> (Tensor, Option<Deferred>) {
    let out = tch::no_grad(|| x.linear::<Tensor>(shadow, None).to_kind(Kind::Float));
    // An operation on the weight requires a gradient exactly when autograd
    // is recording and the weight is trainable.
    let recording = (w.narrow(0, 0, 1).narrow(1, 0, 1) * 1.0).requires_grad();
    if !recording {
        return (bs.map_or_else(|| out.shallow_clone(), |b| &out + b), None);
    }
    let out = out.set_requires_grad(true);
    let deferred = Deferred {
        weight: w.shallow_clone(),
        input: DeferredInput::Bf16 { input: x.shallow_clone(), shadow: shadow.shallow_clone() },
        output: out.shallow_clone(),
        buffer: std::sync::Arc::clone(buffer),
    };
    (bs.map_or_else(|| out.shallow_clone(), |b| &out + b), Some(deferred))
}

/// X · Wᵀ + b for the transposed weight `wt` [columns × width] (a CPU f32
/// tensor) and bias `bs` [width]. When autograd is recording (grad mode on
/// and the bias trainable), the product is a leaf that requires a gradient,
/// and the `Deferred` returned with it turns that gradient into the weight's.
pub fn linear_t(x: &Rc<SparseInput>, wt: &Tensor, bs: &Tensor, buffer: &GradBuffer) -> (Tensor, Option<Deferred>) {
    let width = wt.size()[1] as usize;
    let wt_c = wt.detach().contiguous();
    let out = Tensor::empty([x.rows.n_rows as i64, width as i64], (Kind::Float, Device::Cpu));
    // SAFETY: `wt_c` is contiguous f32 of columns × width elements (checked
    // by `matmul`), `out` a fresh contiguous f32 tensor of rows × width.
    let (ws, os) = unsafe {
        (
            std::slice::from_raw_parts(wt_c.data_ptr() as *const f32, wt_c.numel()),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, out.numel()),
        )
    };
    x.matmul(ws, width, os, threads());
    let y = &out + bs;
    // The sum requires a gradient exactly when autograd is recording.
    if !y.requires_grad() {
        return (y, None);
    }
    let out = out.set_requires_grad(true);
    let deferred = Deferred {
        weight: wt.shallow_clone(),
        input: DeferredInput::Sparse(Rc::clone(x)),
        output: out.shallow_clone(),
        buffer: std::sync::Arc::clone(buffer),
    };
    (&out + bs, Some(deferred))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> (Csr, Vec<Categorical>) {
        let rows = vec![
            (vec![0u32, 3], vec![1f32, 4.0]),
            (vec![], vec![]),
            (vec![1, 2, 3], vec![2.0, 300.5, 1.0]),
            (vec![0, 1, 2, 3], vec![1.0, 1.0, 7.0, 2.0]),
        ];
        let m = Csr::from_rows(rows, 4);
        let c = Categorical::new("b", vec![1, 0, 2, 1], vec!["a".into(), "b".into(), "c".into()], 4, 0).unwrap();
        (m, vec![c])
    }

    #[test]
    fn columns_hold_log1p_of_the_rows_then_one_hot_covariates() {
        let (m, cats) = example();
        let rows = [3, 0, 2, 1, 3];
        let x = SparseInput::log1p_rows(&m, &rows, &cats);
        assert_eq!((x.rows.n_rows, x.rows.n_cols), (5, 7));
        let dense = Vec::<f32>::try_from(x.to_dense(Device::Cpu).flatten(0, -1)).unwrap();
        let mut want = vec![0f32; 5 * 7];
        for (k, &r) in rows.iter().enumerate() {
            let (idx, val) = m.row(r);
            for (&j, &v) in idx.iter().zip(val) {
                want[k * 7 + j as usize] = (v as f64).ln_1p() as f32;
            }
            want[k * 7 + 4 + cats[0].codes[r] as usize] = 1.0;
        }
        for (a, b) in dense.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{dense:?} vs {want:?}");
        }
        // By column: the same entries, rows ascending within each column.
        let c = x.columns(2);
        assert_eq!(c.colptr[x.rows.n_cols], x.nnz());
        for j in 0..x.rows.n_cols {
            let (a, b) = (c.colptr[j], c.colptr[j + 1]);
            assert!(c.rows[a..b].windows(2).all(|w| w[0] < w[1]));
            for (&r, &v) in c.rows[a..b].iter().zip(&c.values[a..b]) {
                assert_eq!(v, want[r as usize * 7 + j]);
            }
        }
    }

    #[test]
    fn product_and_weight_gradient_match_dense_libtorch_for_any_thread_count() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        let (m, cats) = example();
        let x = Rc::new(SparseInput::log1p_rows(&m, &[0, 1, 2, 3, 2, 0], &cats));
        let dense = x.to_dense(Device::Cpu);
        tch::manual_seed(11);
        let wt = Tensor::randn([7, 19], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let upstream = Tensor::randn([6, 19], (Kind::Float, Device::Cpu));
        // Reference: the dense product and autograd's weight gradient.
        let want = dense.matmul(&wt);
        (&want * &upstream).sum(Kind::Float).backward();
        let want_grad = wt.grad().copy();
        let bs = Tensor::randn([19], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let buffer = GradBuffer::default();
        let want = want.detach() + &bs.detach();
        let before = tch::get_num_threads();
        for threads in [1, 2, 3] {
            tch::set_num_threads(threads);
            let (out, deferred) = linear_t(&x, &wt, &bs, &buffer);
            assert!(out.allclose(&want, 1e-5, 1e-5, false), "forward, {threads} threads");
            let _ = bs.grad().f_zero_();
            (&out * &upstream).sum(Kind::Float).backward();
            let (w, g) = deferred.expect("recorded").gradient().unwrap();
            assert_eq!(w.data_ptr(), wt.data_ptr());
            assert!(g.allclose(&want_grad, 1e-5, 1e-5, false), "gradient, {threads} threads");
            assert!(bs.grad().allclose(&upstream.sum_dim_intlist(0, false, Kind::Float), 1e-5, 1e-5, false));
            let (plain, none) = tch::no_grad(|| linear_t(&x, &wt, &bs, &buffer));
            assert!(none.is_none() && !plain.requires_grad());
            assert!(plain.allclose(&want, 1e-5, 1e-5, false));
        }
        tch::set_num_threads(before);
        // A product that never reaches a loss has no gradient to give.
        let (_, d) = linear_t(&x, &wt, &bs, &buffer);
        assert!(d.expect("recorded").gradient().is_none());
    }
}
