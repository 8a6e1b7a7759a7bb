//! The VAE's reconstruction term, softmax to log-likelihood, in one pass per
//! cell with its gradient, for CPU training.
//!
//! libtorch evaluates log p(x | μ = ℓ · softmax(logits), θ, π) as some forty
//! separate passes over the [cells × genes] minibatch (forward and backward),
//! each a round trip through memory and a thread fork. Here every cell's row
//! is read once, the per-entry terms are computed with the SIMD-friendly
//! functions of `vmath`, and the gradients with respect to the logits, the
//! log library size, log θ and the dropout logits are written at once. The
//! autograd graph then receives them through a surrogate (see
//! `likelihood::fused_log_likelihood`), so the rest of the model is unchanged.
//!
//! Per entry, with u = θ + μ + ε and A = θ (log(θ + ε) − log u):
//! - NB, x = 0: A; x > 0: A + x (log(μ + ε) − log u) + log Γ(x + θ) − log Γ(θ).
//! - ZINB, x = 0: softplus(A − π) − softplus(−π); x > 0: −softplus(−π) − π + (NB, x > 0).
//! - Poisson, rate μ: −μ + x log(μ + ε).
//!
//! The zero case is evaluated on every entry and corrected at the non-zeros,
//! which are the minority. The softmax backward is dℓ/dlogit_g = q_g − ρ_g Σ q
//! with q_g = μ_g ∂ℓ/∂μ_g, and dℓ/dlog ℓ = Σ q.

use super::vmath;
use std::sync::Mutex;

/// ε of the logarithms, as in the libtorch path.
pub const EPS: f32 = 1e-8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Nb,
    Zinb,
    Poisson,
}

/// How the mean μ comes from the decoder's output f and the library ℓ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// μ = exp(log ℓ) · softmax(f) (scVI's decoder).
    Softmax,
    /// μ = exp(log ℓ) · f for a non-negative f (regularizedvi's decoder).
    Scaled,
}

/// A minibatch's counts as CSR rows (column indices within each row in any order).
pub struct Rows<'a> {
    pub indptr: &'a [usize],
    pub indices: &'a [u32],
    pub values: &'a [f32],
}

/// Inputs, all row-major [n_rows × n_genes] unless stated.
pub struct Inputs<'a> {
    pub family: Family,
    pub front: Front,
    pub n_genes: usize,
    /// The decoder's output f (see `Front`).
    pub logits: &'a [f32],
    /// log library size per row.
    pub log_library: &'a [f32],
    /// log θ: one per gene (`n_genes`), or one per entry; unused for Poisson.
    pub log_theta: &'a [f32],
    /// Dropout logits π (ZINB only).
    pub pi_logits: &'a [f32],
    pub counts: Rows<'a>,
}

/// Where the gradients of each row's log-likelihood go (same layouts as the
/// inputs; `log_theta` is always per entry here). Empty slices: not wanted.
pub struct Grads<'a> {
    pub logits: &'a mut [f32],
    pub log_library: &'a mut [f32],
    pub log_theta: &'a mut [f32],
    pub pi_logits: &'a mut [f32],
}

/// Distinct per-row θ whose per-gene constants are computed once.
const MAX_THETA_LEVELS: usize = 16;

/// Per-gene constants of a θ shared by several rows.
struct GeneTheta {
    theta: Vec<f32>,
    log_theta_eps: Vec<f32>,
    inv_theta_eps: Vec<f32>,
    lgamma: Vec<f32>,
    digamma: Vec<f32>,
}

impl GeneTheta {
    fn new(log_theta: &[f32]) -> GeneTheta {
        let theta: Vec<f32> = log_theta.iter().map(|&r| vmath::exp(r)).collect();
        let (lgamma, digamma) = theta.iter().map(|&t| vmath::lgamma_digamma(t)).unzip();
        GeneTheta {
            log_theta_eps: theta.iter().map(|&t| vmath::ln(t + EPS)).collect(),
            inv_theta_eps: theta.iter().map(|&t| 1.0 / (t + EPS)).collect(),
            lgamma,
            digamma,
            theta,
        }
    }
}

/// Each row's log-likelihood without −Σ log Γ(x + 1), into `out`; with
/// `grads`, also its gradients. Rows are shared out among libtorch's OpenMP
/// threads (`crate::omp`); each row's result does not depend on how many.
pub fn log_likelihood(inp: &Inputs, out: &mut [f32], grads: Option<Grads>) {
    let g = inp.n_genes;
    let n = out.len();
    assert_eq!(inp.logits.len(), n * g, "logits");
    assert_eq!(inp.log_library.len(), n, "log library");
    assert_eq!(inp.counts.indptr.len(), n + 1, "count rows");
    let shared = inp.family != Family::Poisson && inp.log_theta.len() == g;
    if inp.family != Family::Poisson {
        assert!(shared || inp.log_theta.len() == n * g, "log theta");
    }
    if inp.family == Family::Zinb {
        assert_eq!(inp.pi_logits.len(), n * g, "dropout logits");
    }
    let gene_theta = shared.then(|| GeneTheta::new(inp.log_theta));
    // Per-row θ that repeats (one row per batch or dispersion level, as in a
    // gene-batch dispersion): its per-gene constants once per distinct row.
    let mut levels: Vec<(usize, GeneTheta)> = Vec::new();
    let mut row_level: Vec<Option<usize>> = vec![None; n];
    if inp.family != Family::Poisson && !shared {
        let row = |r: usize| &inp.log_theta[r * g..(r + 1) * g];
        for (r, level) in row_level.iter_mut().enumerate() {
            let seen = levels.iter().position(|&(rep, _)| row(rep)[..1] == row(r)[..1] && row(rep) == row(r));
            *level = match seen {
                Some(k) => Some(k),
                None if levels.len() < MAX_THETA_LEVELS => {
                    levels.push((r, GeneTheta::new(row(r))));
                    Some(levels.len() - 1)
                }
                None => None,
            };
        }
    }
    let want = grads.is_some();
    let grads =
        grads.unwrap_or(Grads { logits: &mut [], log_library: &mut [], log_theta: &mut [], pi_logits: &mut [] });
    if want {
        assert_eq!(grads.logits.len(), n * g);
        assert_eq!(grads.log_library.len(), n);
        if inp.family != Family::Poisson {
            assert_eq!(grads.log_theta.len(), n * g);
        }
        if inp.family == Family::Zinb {
            assert_eq!(grads.pi_logits.len(), n * g);
        }
    }
    fn rows_of(s: &mut [f32], w: usize, n: usize) -> Vec<Option<&mut [f32]>> {
        if s.is_empty() {
            (0..n).map(|_| None).collect()
        } else {
            s.chunks_mut(w).map(Some).collect()
        }
    }
    let gl = rows_of(grads.logits, g, n);
    let gt = rows_of(grads.log_theta, g, n);
    let gp = rows_of(grads.pi_logits, g, n);
    let glib = rows_of(grads.log_library, 1, n);
    // Contiguous blocks of rows, one per thread of libtorch's OpenMP team.
    let threads = (tch::get_num_threads().max(1) as usize).min(n.max(1));
    let mut parts: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
    for (r, job) in out.iter_mut().zip(gl).zip(gt).zip(gp).zip(glib).enumerate() {
        parts[r * threads / n.max(1)].push((r, job));
    }
    let parts: Vec<Mutex<Vec<_>>> = parts.into_iter().map(Mutex::new).collect();
    crate::omp::run(threads, &|member, members| {
        let mut scratch = Scratch::default();
        for part in parts.iter().skip(member).step_by(members) {
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            for (r, ((((o, gl), gt), gp), glib)) in part.drain(..) {
                let theta = gene_theta.as_ref().or_else(|| row_level[r].map(|k| &levels[k].1));
                let row = RowJob { inp, r, gene_theta: theta, gl, gt, gp, glib };
                *o = run_row(row, &mut scratch);
            }
        }
    });
}

#[derive(Default)]
struct Scratch {
    f: Vec<f32>,
    q: Vec<f32>,
    rho: Vec<f32>,
    theta: Vec<f32>,
    lte: Vec<f32>,
    ite: Vec<f32>,
    nz: Vec<f32>,
    sink_t: Vec<f32>,
    sink_p: Vec<f32>,
}

struct RowJob<'a, 'b> {
    inp: &'a Inputs<'a>,
    r: usize,
    gene_theta: Option<&'a GeneTheta>,
    gl: Option<&'b mut [f32]>,
    gt: Option<&'b mut [f32]>,
    gp: Option<&'b mut [f32]>,
    glib: Option<&'b mut [f32]>,
}

crate::simd::wide_copies! {
    fn run_row(job: RowJob, s: &mut Scratch) -> f32 = row
}

/// Indices of the non-zero-case arrays in `Scratch::nz` (struct of arrays).
const NZ_FIELDS: usize = 10;

// Indexed loops over equal-length slices: the form LLVM vectorizes.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn row(mut job: RowJob, s: &mut Scratch) -> f32 {
    let inp = job.inp;
    let g = inp.n_genes;
    let r = job.r;
    let fam = inp.family;
    let grad = job.gl.is_some();
    let logits = &inp.logits[r * g..(r + 1) * g];
    let lam = vmath::exp(inp.log_library[r]);
    for v in [&mut s.f, &mut s.q, &mut s.rho, &mut s.theta, &mut s.lte, &mut s.ite] {
        v.resize(g, 0.0);
    }

    match inp.front {
        // Softmax: ρ = e^(logit − max) / Σ.
        Front::Softmax => {
            let m = vmath::max(logits);
            for (e, &l) in s.rho.iter_mut().zip(logits) {
                *e = vmath::exp(l - m);
            }
            let inv_total = 1.0 / vmath::sum(&s.rho);
            for e in s.rho.iter_mut() {
                *e *= inv_total;
            }
        }
        Front::Scaled => s.rho.copy_from_slice(logits),
    }

    // θ and its logarithm for this row.
    let (theta, lte, ite): (&[f32], &[f32], &[f32]) = match (fam, job.gene_theta) {
        (Family::Poisson, _) => (&[], &[], &[]),
        (_, Some(gt)) => (&gt.theta, &gt.log_theta_eps, &gt.inv_theta_eps),
        (_, None) => {
            let lt = &inp.log_theta[r * g..(r + 1) * g];
            for k in 0..g {
                let t = vmath::exp(lt[k]);
                s.theta[k] = t;
                s.lte[k] = vmath::ln(t + EPS);
                s.ite[k] = 1.0 / (t + EPS);
            }
            (&s.theta, &s.lte, &s.ite)
        }
    };
    let pi = if fam == Family::Zinb { &inp.pi_logits[r * g..(r + 1) * g] } else { &[][..] };

    // Every entry as if its count were zero. Without gradients, the
    // gradient rows are scratch space (the loops stay branch-free).
    s.sink_t.resize(g, 0.0);
    s.sink_p.resize(g, 0.0);
    let gt: &mut [f32] = match job.gt.as_deref_mut() {
        Some(v) => v,
        None => &mut s.sink_t,
    };
    let gp: &mut [f32] = match job.gp.as_deref_mut() {
        Some(v) => v,
        None => &mut s.sink_p,
    };
    let (f, q, rho) = (&mut s.f[..g], &mut s.q[..g], &s.rho[..g]);
    match fam {
        Family::Poisson => {
            for k in 0..g {
                let mu = lam * rho[k];
                f[k] = -mu;
                q[k] = -1.0;
            }
        }
        Family::Nb | Family::Zinb => {
            // The NB part A = θ log((θ + ε)/u) and its derivatives; ZINB then
            // mixes in the dropout in a second loop (two small loops stay in
            // vector registers where one large one did not).
            let (theta, lte, ite, gt) = (&theta[..g], &lte[..g], &ite[..g], &mut gt[..g]);
            for k in 0..g {
                let mu = lam * rho[k];
                let th = theta[k];
                let u = th + mu + EPS;
                let iu = 1.0 / u;
                let d_log = lte[k] - vmath::ln(u);
                f[k] = th * d_log; // A
                q[k] = -th * iu; // ∂A/∂μ
                gt[k] = (d_log + th * (ite[k] - iu)) * th; // θ ∂A/∂θ
            }
            if fam == Family::Zinb {
                let (pi, gp) = (&pi[..g], &mut gp[..g]);
                for k in 0..g {
                    let p = pi[k];
                    let (sp_t, sig_t) = vmath::softplus_sigmoid(f[k] - p);
                    let (sp_np, sig_np) = vmath::softplus_sigmoid(-p);
                    f[k] = sp_t - sp_np;
                    q[k] *= sig_t;
                    gt[k] *= sig_t;
                    gp[k] = sig_np - sig_t;
                }
            }
        }
    }
    let mut total = vmath::sum(f);

    // Corrections at the non-zeros: the per-gene values gathered into
    // contiguous arrays, the terms computed in one vectorizable loop, the
    // gradients scattered back.
    let (lo, hi) = (inp.counts.indptr[r], inp.counts.indptr[r + 1]);
    let idx = &inp.counts.indices[lo..hi];
    let xs = &inp.counts.values[lo..hi];
    let nnz = idx.len();
    if nnz > 0 {
        s.nz.resize(nnz * NZ_FIELDS, 0.0);
        let (mu_a, rest) = s.nz.split_at_mut(nnz);
        let (th_a, rest) = rest.split_at_mut(nnz);
        let (lte_a, rest) = rest.split_at_mut(nnz);
        let (ite_a, rest) = rest.split_at_mut(nnz);
        let (pi_a, rest) = rest.split_at_mut(nnz);
        let (lgt_a, rest) = rest.split_at_mut(nnz);
        let (dgt_a, rest) = rest.split_at_mut(nnz);
        let (df_a, rest) = rest.split_at_mut(nnz);
        let (dq_a, rest) = rest.split_at_mut(nnz);
        let (dt_a, _) = rest.split_at_mut(nnz);
        for (i, &j) in idx.iter().enumerate() {
            let j = j as usize;
            mu_a[i] = lam * rho[j];
            if fam != Family::Poisson {
                th_a[i] = theta[j];
                lte_a[i] = lte[j];
                ite_a[i] = ite[j];
                if let Some(gtc) = job.gene_theta {
                    lgt_a[i] = gtc.lgamma[j];
                    dgt_a[i] = gtc.digamma[j];
                }
            }
            if fam == Family::Zinb {
                pi_a[i] = pi[j];
            }
        }
        if fam != Family::Poisson && job.gene_theta.is_none() {
            for i in 0..nnz {
                let (lg, dg) = vmath::lgamma_digamma(th_a[i]);
                lgt_a[i] = lg;
                dgt_a[i] = dg;
            }
        }
        match fam {
            Family::Poisson => {
                for i in 0..nnz {
                    let (x, mu) = (xs[i], mu_a[i]);
                    df_a[i] = x * vmath::ln(mu + EPS);
                    dq_a[i] = x / (mu + EPS);
                }
            }
            Family::Nb => {
                for i in 0..nnz {
                    let (x, mu, th) = (xs[i], mu_a[i], th_a[i]);
                    let u = th + mu + EPS;
                    let iu = 1.0 / u;
                    let im = 1.0 / (mu + EPS);
                    let (lg, dg) = vmath::lgamma_digamma(x + th);
                    df_a[i] = x * vmath::ln((mu + EPS) * iu) + lg - lgt_a[i];
                    dq_a[i] = x * (im - iu);
                    dt_a[i] = (-x * iu + dg - dgt_a[i]) * th;
                }
            }
            Family::Zinb => {
                for i in 0..nnz {
                    let (x, mu, th, p) = (xs[i], mu_a[i], th_a[i], pi_a[i]);
                    let u = th + mu + EPS;
                    let iu = 1.0 / u;
                    let im = 1.0 / (mu + EPS);
                    let lu = vmath::ln(u);
                    let d_log = lte_a[i] - lu;
                    let a = th * d_log;
                    let (sp_t, sig_t) = vmath::softplus_sigmoid(a - p);
                    let keep = 1.0 - sig_t;
                    let (lg, dg) = vmath::lgamma_digamma(x + th);
                    df_a[i] = -p + a - sp_t + x * vmath::ln((mu + EPS) * iu) + lg - lgt_a[i];
                    dq_a[i] = -keep * th * iu + x * (im - iu);
                    dt_a[i] = (keep * (d_log + th * (ite_a[i] - iu)) - x * iu + dg - dgt_a[i]) * th;
                    // dπ into π's slot, read above.
                    pi_a[i] = sig_t - 1.0;
                }
            }
        }
        total += vmath::sum(df_a);
        if grad {
            for (i, &j) in idx.iter().enumerate() {
                let j = j as usize;
                q[j] += dq_a[i];
                if fam != Family::Poisson {
                    gt[j] += dt_a[i];
                }
                if fam == Family::Zinb {
                    gp[j] += pi_a[i];
                }
            }
        }
    }

    // q holds ∂ℓ/∂μ; with μ = λ ρ: ∂ℓ/∂log λ = Σ μ q, and the softmax
    // backward ∂ℓ/∂logit_g = μ_g q_g − ρ_g Σ μ q (or ∂ℓ/∂ρ = λ q when ρ is given).
    if let (Some(gl), Some(glib)) = (job.gl, job.glib) {
        let gl = &mut gl[..g];
        for k in 0..g {
            gl[k] = lam * rho[k] * q[k];
        }
        let total_q = vmath::sum(gl);
        match inp.front {
            Front::Softmax => {
                for k in 0..g {
                    gl[k] -= rho[k] * total_q;
                }
            }
            Front::Scaled => {
                for k in 0..g {
                    gl[k] = lam * q[k];
                }
            }
        }
        glib[0] = total_q;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::super::{
        fused_log_kernel_rows, nb_log_kernel_rows, poisson_log_kernel_rows, zinb_log_kernel_rows, RawDecoded,
        SparseBatch,
    };
    use super::{Family, Front};
    use crate::data::Csr;
    use tch::{Device, Kind, Tensor};

    /// Counts with zeros, small and large values (up to 5,000) and an empty row.
    fn counts(n: usize, g: usize) -> Csr {
        let (mut indptr, mut indices, mut values) = (vec![0], vec![], vec![]);
        for r in 0..n {
            for j in 0..g {
                let h = (r * 7919 + j * 104_729) % 97;
                if r != 3 && h < 30 {
                    indices.push(j as u32);
                    values.push(match h % 5 {
                        0 => 5000.0,
                        1 => 37.0,
                        _ => (1 + h % 4) as f32,
                    });
                }
            }
            indptr.push(indices.len());
        }
        Csr { n_rows: n, n_cols: g, indptr, indices, values }
    }

    fn leaf(t: Tensor) -> Tensor {
        t.set_requires_grad(true)
    }

    /// Value and gradients of Σ_rows w_r · ll_r by both paths.
    /// `theta_levels`: 0 for one θ per gene; k for k distinct θ rows, row r
    /// using level r mod k (k > 16 leaves some rows to the uncached path).
    fn both(family: Family, theta_levels: i64, front: Front) {
        let (n, g) = (21i64, 301i64);
        tch::manual_seed(3);
        let m = counts(n as usize, g as usize);
        let rows: Vec<usize> = (0..n as usize).collect();
        let c = SparseBatch::from_csr(&m, &rows, Device::Cpu);
        let logits = leaf(Tensor::randn([n, g], (Kind::Float, Device::Cpu)) * 3.0);
        let log_library = leaf(Tensor::randn([n, 1], (Kind::Float, Device::Cpu)) + 7.0);
        let base = leaf(Tensor::randn([theta_levels.max(1), g], (Kind::Float, Device::Cpu)) * 2.0);
        let codes = Tensor::arange(n, (Kind::Int64, Device::Cpu)).remainder(theta_levels.max(1));
        // Built afresh for each path (each backward frees its graph).
        let log_theta = || if theta_levels == 0 { base.reshape([g]) } else { base.index_select(0, &codes) };
        let pi = leaf(Tensor::randn([n, g], (Kind::Float, Device::Cpu)) * 4.0);
        let weights = Tensor::rand([n], (Kind::Float, Device::Cpu)) + 0.5;
        let params = [&logits, &log_library, &base, &pi];
        let grads_of = |total: Tensor| -> (f64, Vec<Tensor>) {
            for p in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            total.backward();
            let grad = |p: &Tensor| if p.grad().defined() { p.grad().copy() } else { p.zeros_like() };
            (total.double_value(&[]), params.iter().map(|p| grad(p)).collect())
        };
        // A positive decoder output for the scaled front (regularizedvi's softplus).
        let output = || if front == Front::Softmax { logits.shallow_clone() } else { logits.softplus() };
        let rate = match front {
            Front::Softmax => log_library.exp() * logits.softmax(-1, Kind::Float),
            Front::Scaled => log_library.exp() * output(),
        };
        let theta = if theta_levels > 0 { log_theta().exp() } else { log_theta().exp().unsqueeze(0) };
        let reference = match family {
            Family::Nb => nb_log_kernel_rows(&c, &rate, &theta, 1e-8),
            Family::Zinb => zinb_log_kernel_rows(&c, &rate, &theta, &pi, 1e-8),
            Family::Poisson => poisson_log_kernel_rows(&c, &rate, 1e-8),
        };
        let (v0, g0) = grads_of((&reference * &weights).sum(Kind::Float));
        let (output, log_theta) = (output(), log_theta());
        let raw = RawDecoded {
            family,
            front,
            logits: &output,
            log_library: &log_library,
            log_theta: (family != Family::Poisson).then_some(&log_theta),
            pi_logits: (family == Family::Zinb).then_some(&pi),
        };
        let fused = fused_log_kernel_rows(&c, &raw).expect("applies on CPU f32");
        assert!(reference.allclose(&fused, 1e-4, 1e-2, false), "{family:?} per row: {reference} vs {fused}");
        let (v1, g1) = grads_of((&fused * &weights).sum(Kind::Float));
        assert!((v0 - v1).abs() <= 1e-4 * v0.abs(), "{family:?}: {v0} vs {v1}");
        for (k, (a, b)) in g0.iter().zip(&g1).enumerate() {
            if family == Family::Poisson && k >= 2 || family == Family::Nb && k == 3 {
                continue; // not inputs of this family
            }
            let scale = a.abs().max().double_value(&[]);
            let err = (a - b).abs().max().double_value(&[]);
            assert!(err <= 2e-4 * scale + 1e-5, "{family:?} gradient {k}: max error {err} at scale {scale}");
        }
        // Without gradients: the value only.
        tch::no_grad(|| {
            let v = fused_log_kernel_rows(&c, &raw).unwrap();
            assert!(!v.requires_grad() && v.allclose(&reference.detach(), 1e-4, 1e-2, false));
        });
    }

    #[test]
    fn fused_kernel_matches_the_tensor_path_value_and_gradients() {
        // The generator is global: take a turn with the training tests.
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        for family in [Family::Nb, Family::Zinb, Family::Poisson] {
            both(family, 0, Front::Softmax);
            both(family, 0, Front::Scaled);
        }
        for levels in [2, 21] {
            both(Family::Nb, levels, Front::Softmax);
            both(Family::Zinb, levels, Front::Softmax);
            both(Family::Nb, levels, Front::Scaled);
        }
    }

    #[test]
    fn fused_kernel_steps_aside_without_host_counts() {
        let m = counts(2, 5);
        let mut c = SparseBatch::from_csr(&m, &[0, 1], Device::Cpu);
        c.host = None;
        let logits = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
        let lib = Tensor::zeros([2, 1], (Kind::Float, Device::Cpu));
        let poisson = |logits| RawDecoded {
            family: Family::Poisson,
            front: Front::Softmax,
            logits,
            log_library: &lib,
            log_theta: None,
            pi_logits: None,
        };
        assert!(fused_log_kernel_rows(&c, &poisson(&logits)).is_none());
        let c = SparseBatch::from_csr(&m, &[0, 1], Device::Cpu);
        let logits = logits.to_kind(Kind::Double);
        assert!(fused_log_kernel_rows(&c, &poisson(&logits)).is_none(), "f64 goes the tensor way");
    }
}
