//! Log-likelihoods of cells under many candidate decodings drawn from one
//! pool, value only, for the cross-species analyses.
//!
//! Label transfer scores each target cell against ~250 context cells, each
//! decoded once per batch (the pool). Through the fused kernel every
//! (cell, candidate) pair is a row of its own: the candidate's logits and
//! dropout logits are copied out of the pool, the softmax is taken again,
//! and the gradient terms are computed and dropped. Here the pool holds ρ
//! (the softmax) and log σ(π) once, a pair reads its candidate's row in
//! place, and only the value is computed: per entry one `ln` (NB) and one
//! softplus more (ZINB).
//!
//! The terms are the fused kernel's (see `fused`), with u = θ + μ + ε and
//! A = θ (log(θ + ε) − log u):
//! - NB: Σ_g A + Σ_{x > 0} [x (log(μ + ε) − log u) + log Γ(x + θ) − log Γ(θ)];
//! - ZINB: Σ_g [softplus(A − π) + log σ(π)] + Σ_{x > 0} [−π + A − softplus(A − π)
//!   + x (log(μ + ε) − log u) + log Γ(x + θ) − log Γ(θ)].
//!
//! As in `fused`, log Γ(x + 1) is left to the caller.

use super::fused::{Rows, EPS};
use super::vmath;
use crate::likelihood::Likelihood;

/// Decoded candidates, row-major [rows × n_genes].
pub struct Pool<'a> {
    /// NB or ZINB.
    pub family: Likelihood,
    pub n_genes: usize,
    /// ρ = softmax(logits) per row.
    pub rho: &'a [f32],
    /// Dropout logits π and log σ(π) (ZINB; empty for NB).
    pub pi: &'a [f32],
    pub log_sigmoid_pi: &'a [f32],
    pub log_theta: Theta<'a>,
}

/// log θ, [n_genes] or row-major [rows × n_genes].
#[derive(Clone, Copy)]
pub enum Theta<'a> {
    /// One value per gene for every pair.
    Shared(&'a [f32]),
    /// One row per pool row (θ decoded with the candidate).
    PerCandidate(&'a [f32]),
    /// One row per scored cell (θ of the cell's batch).
    PerCell(&'a [f32]),
}

/// Scratch of one thread.
#[derive(Default)]
struct Scratch {
    f: Vec<f32>,
    /// Per gene of the pair: log u, A and (ZINB) softplus(A − π), which the
    /// non-zeros' corrections read back instead of computing them again.
    lu: Vec<f32>,
    a: Vec<f32>,
    sp: Vec<f32>,
    theta: Vec<f32>,
    lte: Vec<f32>,
    nz_theta: Vec<f32>,
    nz_lgamma: Vec<f32>,
    nz: Vec<f32>,
}

/// What the zero pass writes per gene (see `Scratch`).
struct PerGene<'a> {
    f: &'a mut [f32],
    lu: &'a mut [f32],
    a: &'a mut [f32],
    sp: &'a mut [f32],
}

/// A pair's values at the cell's non-zeros (`Scratch::nz`'s arrays).
struct NonZeros<'a> {
    xs: &'a [f32],
    lgamma: &'a [f32],
    lu: &'a [f32],
    a: &'a [f32],
    sp: &'a [f32],
    pi: &'a [f32],
}

/// `out[i · k + c]` = log p(x_i | μ = exp(log_library[i]) · ρ_j, θ, π_j)
/// (without log Γ(x + 1)) for cell i (row i of `counts`) and j =
/// `candidates[i · k + c]`, a row of `pool`. Cells are shared out among
/// libtorch's OpenMP threads in contiguous blocks; each value depends on its
/// pair alone, not on the number of threads.
pub fn pool_log_likelihood(
    pool: &Pool,
    counts: Rows,
    log_library: &[f32],
    candidates: &[u32],
    k: usize,
    out: &mut [f32],
) {
    let g = pool.n_genes;
    let n = log_library.len();
    let n_pool = pool.rho.len() / g.max(1);
    assert!(matches!(pool.family, Likelihood::Nb | Likelihood::Zinb), "NB or ZINB");
    assert_eq!(pool.rho.len(), n_pool * g, "ρ");
    assert_eq!(counts.indptr.len(), n + 1, "count rows");
    assert_eq!(candidates.len(), n * k, "candidates");
    assert_eq!(out.len(), n * k, "output");
    assert!(candidates.iter().all(|&j| (j as usize) < n_pool), "candidate rows");
    if pool.family == Likelihood::Zinb {
        assert!(pool.pi.len() == pool.rho.len() && pool.log_sigmoid_pi.len() == pool.rho.len(), "dropout logits");
    }
    match pool.log_theta {
        Theta::Shared(t) => assert_eq!(t.len(), g, "log θ per gene"),
        Theta::PerCandidate(t) => assert_eq!(t.len(), pool.rho.len(), "log θ per candidate"),
        Theta::PerCell(t) => assert_eq!(t.len(), n * g, "log θ per cell"),
    }
    let threads = (tch::get_num_threads().max(1) as usize).min(n.max(1));
    let blocks: Vec<std::sync::Mutex<&mut [f32]>> =
        split_blocks(out, n, k, threads).into_iter().map(std::sync::Mutex::new).collect();
    super::omp::run(threads, &|member, members| {
        let mut s = Scratch::default();
        for (b, block) in blocks.iter().enumerate().skip(member).step_by(members) {
            let mut block = block.lock().unwrap_or_else(|e| e.into_inner());
            let first = b * n / threads;
            for (x, o) in block.chunks_mut(k.max(1)).enumerate() {
                let i = first + x;
                let row = CellRow {
                    counts: &counts,
                    i,
                    log_library: log_library[i],
                    candidates: &candidates[i * k..(i + 1) * k],
                };
                run_cell(pool, &row, o, &mut s);
            }
        }
    });
}

/// `out` cut into `threads` blocks of whole cells (k values each), block b
/// holding cells [b n / threads, (b + 1) n / threads).
fn split_blocks(out: &mut [f32], n: usize, k: usize, threads: usize) -> Vec<&mut [f32]> {
    let mut blocks = Vec::with_capacity(threads);
    let mut rest = out;
    for b in 0..threads {
        let cells = (b + 1) * n / threads - b * n / threads;
        let (head, tail) = rest.split_at_mut(cells * k);
        blocks.push(head);
        rest = tail;
    }
    blocks
}

struct CellRow<'a> {
    counts: &'a Rows<'a>,
    i: usize,
    log_library: f32,
    candidates: &'a [u32],
}

crate::kernels::simd::wide_copies! {
    fn run_cell(pool: &Pool, row: &CellRow, out: &mut [f32], s: &mut Scratch) = fma cell
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn cell<const FMA: bool>(pool: &Pool, row: &CellRow, out: &mut [f32], s: &mut Scratch) {
    let g = pool.n_genes;
    let zinb = pool.family == Likelihood::Zinb;
    let lam = vmath::exp::<FMA>(row.log_library);
    let (lo, hi) = (row.counts.indptr[row.i], row.counts.indptr[row.i + 1]);
    let (idx, xs) = (&row.counts.indices[lo..hi], &row.counts.values[lo..hi]);
    let nnz = idx.len();
    let at_nz = vmath::Indices::new(idx, g);
    for v in [&mut s.f, &mut s.lu, &mut s.a, &mut s.sp] {
        v.resize(g, 0.0);
    }
    s.theta.resize(g, 0.0);
    s.lte.resize(g, 0.0);
    for v in [&mut s.nz_theta, &mut s.nz_lgamma] {
        v.resize(nnz, 0.0);
    }
    // θ, log(θ + ε) and, at the non-zeros, log Γ(x + θ) − log Γ(θ): once
    // per cell unless θ comes with the candidate.
    let once = match pool.log_theta {
        Theta::Shared(t) => Some(t),
        Theta::PerCell(t) => Some(&t[row.i * g..(row.i + 1) * g]),
        Theta::PerCandidate(_) => None,
    };
    if let Some(lt) = once {
        thetas::<FMA>(lt, &mut s.theta[..g], &mut s.lte[..g]);
        nonzero_constants::<FMA>(idx, xs, &s.theta, &mut s.nz_theta, &mut s.nz_lgamma);
    }
    for (o, &j) in out.iter_mut().zip(row.candidates) {
        let j = j as usize;
        if let Theta::PerCandidate(t) = pool.log_theta {
            thetas::<FMA>(&t[j * g..(j + 1) * g], &mut s.theta[..g], &mut s.lte[..g]);
            nonzero_constants::<FMA>(idx, xs, &s.theta, &mut s.nz_theta, &mut s.nz_lgamma);
        }
        let rho = &pool.rho[j * g..(j + 1) * g];
        let (pi, lsp) = if zinb {
            (&pool.pi[j * g..(j + 1) * g], &pool.log_sigmoid_pi[j * g..(j + 1) * g])
        } else {
            (&[][..], &[][..])
        };
        let per_gene = PerGene { f: &mut s.f[..g], lu: &mut s.lu[..g], a: &mut s.a[..g], sp: &mut s.sp[..g] };
        zero_terms::<FMA>(lam, rho, &s.theta[..g], &s.lte[..g], pi, lsp, per_gene);
        let zero = vmath::sum(&s.f[..g]);
        // The non-zeros' corrections: (ρ, log u, A, softplus(A − π), π)
        // gathered into `s.nz` (five arrays of nnz), then the terms.
        s.nz.resize(5 * nnz, 0.0);
        let (d, rest) = s.nz.split_at_mut(nnz);
        let (lu, rest) = rest.split_at_mut(nnz);
        let (a, rest) = rest.split_at_mut(nnz);
        let (sp, p) = rest.split_at_mut(nnz);
        vmath::gather(rho, at_nz, d);
        vmath::gather(&s.lu, at_nz, lu);
        if zinb {
            vmath::gather(&s.a, at_nz, a);
            vmath::gather(&s.sp, at_nz, sp);
            vmath::gather(pi, at_nz, p);
        }
        let at = NonZeros { xs, lgamma: &s.nz_lgamma[..nnz], lu, a, sp, pi: p };
        nonzero_terms::<FMA>(lam, &at, zinb, d);
        *o = zero + vmath::sum(d);
    }
}

/// θ = exp(log θ) and log(θ + ε).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn thetas<const FMA: bool>(log_theta: &[f32], theta: &mut [f32], lte: &mut [f32]) {
    let g = theta.len();
    let (lt, lte) = (&log_theta[..g], &mut lte[..g]);
    for k in 0..g {
        let t = vmath::exp::<FMA>(lt[k]);
        theta[k] = t;
        lte[k] = vmath::ln::<FMA>(t + EPS);
    }
}

/// log Γ(x + θ) − log Γ(θ) at the non-zeros `idx` (counts `xs`), θ
/// gathered into `nt` on the way.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn nonzero_constants<const FMA: bool>(idx: &[u32], xs: &[f32], theta: &[f32], nt: &mut [f32], lg: &mut [f32]) {
    let n = idx.len();
    let (nt, lg, xs) = (&mut nt[..n], &mut lg[..n], &xs[..n]);
    for (x, &j) in idx.iter().enumerate() {
        nt[x] = theta[j as usize];
    }
    for x in 0..n {
        lg[x] = vmath::lgamma::<FMA>(xs[x] + nt[x]) - vmath::lgamma::<FMA>(nt[x]);
    }
}

/// Every entry's term as if its count were zero, into `out.f`, keeping
/// log u, A and (ZINB) softplus(A − π) for the non-zeros (slices as
/// arguments, so that the loops vectorize).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn zero_terms<const FMA: bool>(
    lam: f32,
    rho: &[f32],
    theta: &[f32],
    lte: &[f32],
    pi: &[f32],
    lsp: &[f32],
    out: PerGene,
) {
    let PerGene { f, lu, a, sp } = out;
    let g = f.len();
    let (rho, theta, lte, lu) = (&rho[..g], &theta[..g], &lte[..g], &mut lu[..g]);
    for k in 0..g {
        let u = theta[k] + lam * rho[k] + EPS;
        lu[k] = vmath::ln::<FMA>(u);
        f[k] = theta[k] * (lte[k] - lu[k]);
    }
    if !pi.is_empty() {
        let (pi, lsp, a, sp) = (&pi[..g], &lsp[..g], &mut a[..g], &mut sp[..g]);
        for k in 0..g {
            a[k] = f[k];
            sp[k] = vmath::softplus_sigmoid::<FMA>(f[k] - pi[k]).0;
            f[k] = sp[k] + lsp[k];
        }
    }
}

/// The corrections at the non-zeros: `d` holds ρ at them on entry and the
/// terms on exit; `at` the rest of the pair's values there, from the zero
/// pass (one `ln` per non-zero is left).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn nonzero_terms<const FMA: bool>(lam: f32, at: &NonZeros, zinb: bool, d: &mut [f32]) {
    let n = d.len();
    let (xs, lgamma, lu) = (&at.xs[..n], &at.lgamma[..n], &at.lu[..n]);
    if zinb {
        let (a, sp, pi) = (&at.a[..n], &at.sp[..n], &at.pi[..n]);
        for x in 0..n {
            let mu = lam * d[x];
            d[x] = -pi[x] + a[x] - sp[x] + xs[x] * (vmath::ln::<FMA>(mu + EPS) - lu[x]) + lgamma[x];
        }
    } else {
        for x in 0..n {
            let mu = lam * d[x];
            d[x] = xs[x] * (vmath::ln::<FMA>(mu + EPS) - lu[x]) + lgamma[x];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SparseBatch;
    use crate::kernels::fused::tests::counts;
    use crate::likelihood::{fused_log_kernel_rows, RawDecoded};
    use tch::{Device, Kind, Tensor};

    /// Each pair's value equals the fused kernel's on the candidate's row
    /// copied out of the pool, for NB and ZINB, θ per gene, candidate or cell, at one
    /// thread and at two.
    #[test]
    fn pool_scores_match_the_fused_kernel_on_copied_rows() {
        let _guard = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        let (n, g, n_pool, k) = (7, 37, 11, 5);
        let m = counts(n, g);
        tch::manual_seed(3);
        let logits = Tensor::randn([n_pool as i64, g as i64], (Kind::Float, Device::Cpu)) * 2.0;
        let pi = Tensor::randn([n_pool as i64, g as i64], (Kind::Float, Device::Cpu)) * 1.5;
        let lib = Tensor::randn([n as i64, 1], (Kind::Float, Device::Cpu)) * 0.5 + 5.0;
        let cand: Vec<u32> = (0..n * k).map(|e| ((e * 7 + 3) % n_pool) as u32).collect();
        let rows: Vec<usize> = (0..n).flat_map(|i| std::iter::repeat_n(i, k)).collect();
        let x = SparseBatch::from_csr(&m, &rows, Device::Cpu);
        let pick = Tensor::from_slice(&cand.iter().map(|&c| c as i64).collect::<Vec<_>>());
        let rho = logits.softmax(-1, Kind::Float).contiguous();
        let lsp = pi.log_sigmoid().contiguous();
        let flat = |t: &Tensor| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        let (rho_v, pi_v, lsp_v, lib_v) = (flat(&rho), flat(&pi), flat(&lsp), flat(&lib));
        for family in [Likelihood::Nb, Likelihood::Zinb] {
            for mode in 0..3 {
                // θ per gene, per candidate (pool row) or per cell.
                let rows_of_theta = [1, n_pool, n][mode] as i64;
                let log_theta = Tensor::randn([rows_of_theta, g as i64], (Kind::Float, Device::Cpu));
                let lt_v = flat(&log_theta);
                let per_pair = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
                let lt_rows = match mode {
                    0 => log_theta.get(0),
                    1 => log_theta.index_select(0, &pick),
                    _ => log_theta.index_select(0, &per_pair),
                };
                let theta = match mode {
                    0 => Theta::Shared(&lt_v),
                    1 => Theta::PerCandidate(&lt_v),
                    _ => Theta::PerCell(&lt_v),
                };
                let pi_rows = pi.index_select(0, &pick);
                let raw = RawDecoded {
                    family,
                    logits: &logits.index_select(0, &pick),
                    log_library: &lib.repeat_interleave_self_int(k as i64, Some(0), None),
                    log_theta: Some(&lt_rows),
                    pi_logits: (family == Likelihood::Zinb).then_some(&pi_rows),
                };
                let want = flat(&tch::no_grad(|| fused_log_kernel_rows(&x, &raw)).expect("the fused kernel applies"));
                let zinb = family == Likelihood::Zinb;
                let pool = Pool {
                    family,
                    n_genes: g,
                    rho: &rho_v,
                    pi: if zinb { &pi_v } else { &[] },
                    log_sigmoid_pi: if zinb { &lsp_v } else { &[] },
                    log_theta: theta,
                };
                for threads in [1, 2] {
                    tch::set_num_threads(threads);
                    let mut got = vec![0f32; n * k];
                    let rows = Rows { indptr: &m.indptr, indices: &m.indices, values: &m.values };
                    pool_log_likelihood(&pool, rows, &lib_v, &cand, k, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{family:?} θ mode {mode}: {a} vs {b}");
                    }
                }
            }
        }
        tch::set_num_threads(1);
    }
}
