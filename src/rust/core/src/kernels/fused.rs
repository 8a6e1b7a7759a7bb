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
//! `likelihood::fused_log_kernel_rows`), so the rest of the model is unchanged.
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
use crate::likelihood::Likelihood;
use std::sync::Mutex;

/// ε of the logarithms, as in the libtorch path.
pub const EPS: f32 = 1e-8;

/// How the mean μ comes from the decoder's output f and the library ℓ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// μ = exp(log ℓ) · softmax(f) (scVI's decoder).
    Softmax,
    /// μ = exp(log ℓ) · (softplus(f) + s) · y (regularizedvi's decoder), with
    /// the ambient background s and the feature scaling y of the row's
    /// levels (`Inputs::ambient`, `Inputs::scaling`; absent: 0 and 1).
    Softplus,
}

/// A per-gene table with one row per level, and the level of each minibatch
/// row: a parameter that the rows share.
#[derive(Clone, Copy)]
pub struct Levels<'a> {
    /// [levels × n_genes], row-major.
    pub table: &'a [f32],
    /// The level of each minibatch row.
    pub codes: &'a [i64],
}

impl<'a> Levels<'a> {
    fn row(&self, r: usize, g: usize) -> &'a [f32] {
        let l = self.codes[r] as usize;
        &self.table[l * g..(l + 1) * g]
    }
}

/// A minibatch's counts as CSR rows (column indices within each row in any order).
pub struct Rows<'a> {
    pub indptr: &'a [usize],
    pub indices: &'a [u32],
    pub values: &'a [f32],
}

/// Inputs, all row-major [n_rows × n_genes] unless stated.
pub struct Inputs<'a> {
    pub family: Likelihood,
    pub front: Front,
    pub n_genes: usize,
    /// The decoder's output f (see `Front`).
    pub logits: &'a [f32],
    /// log library size per row.
    pub log_library: &'a [f32],
    /// log θ: one per gene (`n_genes`), one per entry, or (with
    /// `theta_codes`) a [levels × n_genes] table; unused for Poisson.
    pub log_theta: &'a [f32],
    /// The level of each row in the log θ table.
    pub theta_codes: Option<&'a [i64]>,
    /// Dropout logits π (ZINB only).
    pub pi_logits: &'a [f32],
    /// A bias per gene added to f (`Front::Softplus`; empty for none).
    pub bias: &'a [f32],
    /// s and y of `Front::Softplus` (ignored by `Front::Softmax`).
    pub ambient: Option<Levels<'a>>,
    pub scaling: Option<Levels<'a>>,
    pub counts: Rows<'a>,
    /// With `false`, a value-only call leaves log Γ(x + θ) − log Γ(θ) out of
    /// the rows whose θ is shared (per gene, or a level of the table or of
    /// repeated rows): their values are then log-likelihoods up to a term of
    /// the row's counts and θ alone, enough to rank rows that share both.
    pub count_terms: bool,
}

/// Where the gradients of each row's log-likelihood go (same layouts as the
/// inputs; `log_theta` is per entry here, and unused when log θ is a table).
/// Empty slices: not wanted.
pub struct Grads<'a> {
    pub logits: &'a mut [f32],
    pub log_library: &'a mut [f32],
    pub log_theta: &'a mut [f32],
    pub pi_logits: &'a mut [f32],
    pub shared: SharedGrads<'a>,
}

/// Gradients of the sum over rows with respect to what the rows share, each
/// [levels × n_genes] (empty: not wanted): a bias of the decoder output f
/// (one level: the column sums of ∂/∂f), the ambient s and scaling y of
/// `Front::Softplus`, and the log θ table. Rows are summed per block of the
/// thread split and the blocks added in order, so the result depends on the
/// number of threads asked for, not on scheduling.
#[derive(Default)]
pub struct SharedGrads<'a> {
    pub bias: &'a mut [f32],
    pub ambient: &'a mut [f32],
    pub scaling: &'a mut [f32],
    pub log_theta: &'a mut [f32],
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
        Self::many(&[log_theta]).pop().expect("one row in, one out")
    }

    /// The constants of several rows of log θ, on libtorch's OpenMP team in
    /// blocks of genes (serial work here would leave the team idle).
    fn many(rows: &[&[f32]]) -> Vec<GeneTheta> {
        const BLOCK: usize = 4096;
        let mut out: Vec<GeneTheta> = rows
            .iter()
            .map(|r| {
                let z = || vec![0f32; r.len()];
                GeneTheta { theta: z(), log_theta_eps: z(), inv_theta_eps: z(), lgamma: z(), digamma: z() }
            })
            .collect();
        let mut jobs = Vec::new();
        for (src, t) in rows.iter().zip(out.iter_mut()) {
            let chunks = t
                .theta
                .chunks_mut(BLOCK)
                .zip(t.log_theta_eps.chunks_mut(BLOCK))
                .zip(t.inv_theta_eps.chunks_mut(BLOCK))
                .zip(t.lgamma.chunks_mut(BLOCK))
                .zip(t.digamma.chunks_mut(BLOCK));
            for (src, ((((th, lte), ite), lg), dg)) in src.chunks(BLOCK).zip(chunks) {
                jobs.push(Mutex::new((src, th, lte, ite, lg, dg)));
            }
        }
        let threads = (tch::get_num_threads().max(1) as usize).min(jobs.len());
        super::omp::run(threads, &|member, members| {
            for job in jobs.iter().skip(member).step_by(members) {
                let mut job = job.lock().unwrap_or_else(|e| e.into_inner());
                let (src, th, lte, ite, lg, dg) = &mut *job;
                theta_constants(src, th, lte, ite, lg, dg);
            }
        });
        out
    }
}

/// θ = e^(log θ) and its constants per gene: log(θ + ε), 1/(θ + ε), log Γ(θ), ψ(θ).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn theta_constants_body<const FMA: bool>(
    src: &[f32],
    th: &mut [f32],
    lte: &mut [f32],
    ite: &mut [f32],
    lg: &mut [f32],
    dg: &mut [f32],
) {
    for k in 0..src.len() {
        let t = vmath::exp::<FMA>(src[k]);
        th[k] = t;
        lte[k] = vmath::ln::<FMA>(t + EPS);
        ite[k] = 1.0 / (t + EPS);
        (lg[k], dg[k]) = vmath::lgamma_digamma::<FMA>(t);
    }
}

crate::kernels::simd::wide_copies! {
    fn theta_constants(
        src: &[f32], th: &mut [f32], lte: &mut [f32], ite: &mut [f32], lg: &mut [f32], dg: &mut [f32],
    ) = fma theta_constants_body
}

/// Each row's log-likelihood without −Σ log Γ(x + 1), into `out`; with
/// `grads`, also its gradients. Rows are shared out among libtorch's OpenMP
/// threads (`kernels::omp`); each row's result does not depend on how many.
pub fn log_likelihood(inp: &Inputs, out: &mut [f32], grads: Option<Grads>) {
    let g = inp.n_genes;
    let n = out.len();
    assert_eq!(inp.logits.len(), n * g, "logits");
    assert_eq!(inp.log_library.len(), n, "log library");
    assert_eq!(inp.counts.indptr.len(), n + 1, "count rows");
    let has_theta = inp.family != Likelihood::Poisson;
    let tabled = has_theta && inp.theta_codes.is_some();
    let shared = has_theta && !tabled && inp.log_theta.len() == g;
    if has_theta {
        assert!(tabled || shared || inp.log_theta.len() == n * g, "log theta");
    }
    if inp.family == Likelihood::Zinb {
        assert_eq!(inp.pi_logits.len(), n * g, "dropout logits");
    }
    let n_levels = |t: &[f32]| t.len() / g.max(1);
    let check_levels = |l: &Levels, what: &str| {
        assert!(l.table.len().is_multiple_of(g.max(1)) && l.codes.len() == n, "{what}");
        assert!(l.codes.iter().all(|&c| c >= 0 && (c as usize) < n_levels(l.table)), "{what} codes");
    };
    if tabled {
        let codes = inp.theta_codes.unwrap_or_default();
        check_levels(&Levels { table: inp.log_theta, codes }, "log theta table");
    }
    for (l, what) in [(&inp.ambient, "ambient"), (&inp.scaling, "scaling")] {
        if let Some(l) = l {
            check_levels(l, what);
        }
    }
    let gene_theta = shared.then(|| GeneTheta::new(inp.log_theta));
    // The per-gene constants of θ once per distinct row: per level present
    // when θ is a table; otherwise per repeated row (one per batch or
    // dispersion level, as in a gene-batch dispersion), up to a limit.
    let mut levels: Vec<(usize, GeneTheta)> = Vec::new();
    let mut row_level: Vec<Option<usize>> = vec![None; n];
    if let (true, Some(codes)) = (tabled, inp.theta_codes) {
        let mut present: Vec<usize> = Vec::new();
        for (level, &c) in row_level.iter_mut().zip(codes) {
            let c = c as usize;
            *level = Some(present.iter().position(|&k| k == c).unwrap_or_else(|| {
                present.push(c);
                present.len() - 1
            }));
        }
        let rows: Vec<&[f32]> = present.iter().map(|&c| &inp.log_theta[c * g..(c + 1) * g]).collect();
        levels = present.into_iter().zip(GeneTheta::many(&rows)).collect();
    } else if has_theta && !shared {
        let row = |r: usize| &inp.log_theta[r * g..(r + 1) * g];
        // Rows compared as bits (one memcmp; equal bits are equal values).
        let bits = |r: usize| -> &[u8] {
            let v = row(r);
            // SAFETY: the bytes of a live f32 slice.
            unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
        };
        for (r, level) in row_level.iter_mut().enumerate() {
            let seen = levels.iter().position(|&(rep, _)| bits(rep) == bits(r));
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
    let grads = grads.unwrap_or(Grads {
        logits: &mut [],
        log_library: &mut [],
        log_theta: &mut [],
        pi_logits: &mut [],
        shared: SharedGrads::default(),
    });
    let sg = grads.shared;
    if want {
        assert_eq!(grads.logits.len(), n * g);
        assert_eq!(grads.log_library.len(), n);
        if has_theta && !tabled {
            assert_eq!(grads.log_theta.len(), n * g);
        }
        if inp.family == Likelihood::Zinb {
            assert_eq!(grads.pi_logits.len(), n * g);
        }
        let size = |l: &Option<Levels>| l.map_or(0, |l| l.table.len());
        assert!(sg.bias.is_empty() || sg.bias.len() == g, "bias gradient");
        assert!(sg.ambient.is_empty() || sg.ambient.len() == size(&inp.ambient), "ambient gradient");
        assert!(sg.scaling.is_empty() || sg.scaling.len() == size(&inp.scaling), "scaling gradient");
        assert!(sg.log_theta.is_empty() || (tabled && sg.log_theta.len() == inp.log_theta.len()), "θ table gradient");
    }
    fn rows_of(s: &mut [f32], w: usize, n: usize) -> Vec<Option<&mut [f32]>> {
        if s.is_empty() {
            (0..n).map(|_| None).collect()
        } else {
            s.chunks_mut(w).map(Some).collect()
        }
    }
    let gl = rows_of(grads.logits, g, n);
    let gt = rows_of(if tabled { &mut [] } else { grads.log_theta }, g, n);
    let gp = rows_of(grads.pi_logits, g, n);
    let glib = rows_of(grads.log_library, 1, n);
    // Contiguous blocks of rows, one per thread of libtorch's OpenMP team,
    // each with its own sums of the shared gradients.
    let threads = (tch::get_num_threads().max(1) as usize).min(n.max(1));
    let mut parts: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
    for (r, job) in out.iter_mut().zip(gl).zip(gt).zip(gp).zip(glib).enumerate() {
        parts[r * threads / n.max(1)].push((r, job));
    }
    let new_sums = || Sums {
        bias: vec![0.0; sg.bias.len()],
        ambient: vec![0.0; sg.ambient.len()],
        scaling: vec![0.0; sg.scaling.len()],
        log_theta: vec![0.0; sg.log_theta.len()],
    };
    let parts: Vec<Mutex<(Vec<_>, Sums)>> = parts.into_iter().map(|p| Mutex::new((p, new_sums()))).collect();
    super::omp::run(threads, &|member, members| {
        let mut scratch = Scratch::default();
        for part in parts.iter().skip(member).step_by(members) {
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            let (jobs, sums) = &mut *part;
            for (r, ((((o, gl), gt), gp), glib)) in jobs.drain(..) {
                let theta = gene_theta.as_ref().or_else(|| row_level[r].map(|k| &levels[k].1));
                let row = RowJob { inp, r, gene_theta: theta, gl, gt, gp, glib, sums: want.then_some(&mut *sums) };
                *o = if want { run_row(row, &mut scratch) } else { run_value_row(row, &mut scratch) };
            }
        }
    });
    for (k, part) in parts.into_iter().enumerate() {
        let (_, sums) = part.into_inner().unwrap_or_else(|e| e.into_inner());
        for (to, from) in [
            (&mut *sg.bias, &sums.bias),
            (&mut *sg.ambient, &sums.ambient),
            (&mut *sg.scaling, &sums.scaling),
            (&mut *sg.log_theta, &sums.log_theta),
        ] {
            if k == 0 {
                to.copy_from_slice(from);
            } else {
                to.iter_mut().zip(from).for_each(|(t, f)| *t += f);
            }
        }
    }
}

/// One block's sums of the shared gradients (see `SharedGrads`).
struct Sums {
    bias: Vec<f32>,
    ambient: Vec<f32>,
    scaling: Vec<f32>,
    log_theta: Vec<f32>,
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
    /// softplus(f) + s and σ(f) of `Front::Softplus`.
    base: Vec<f32>,
    sig: Vec<f32>,
}

struct RowJob<'a, 'b> {
    inp: &'a Inputs<'a>,
    r: usize,
    gene_theta: Option<&'a GeneTheta>,
    gl: Option<&'b mut [f32]>,
    gt: Option<&'b mut [f32]>,
    gp: Option<&'b mut [f32]>,
    glib: Option<&'b mut [f32]>,
    sums: Option<&'b mut Sums>,
}

crate::kernels::simd::wide_copies! {
    fn run_row(job: RowJob, s: &mut Scratch) -> f32 = fma row_with_gradients
}

crate::kernels::simd::wide_copies! {
    fn run_value_row(job: RowJob, s: &mut Scratch) -> f32 = fma row_value
}

#[inline(always)]
fn row_with_gradients<const FMA: bool>(job: RowJob, s: &mut Scratch) -> f32 {
    row::<FMA, true>(job, s)
}

/// The value alone: no gradient term is computed (about half of the work
/// under ZINB, where scoring without gradient is most of the calls).
#[inline(always)]
fn row_value<const FMA: bool>(job: RowJob, s: &mut Scratch) -> f32 {
    row::<FMA, false>(job, s)
}

/// Indices of the non-zero-case arrays in `Scratch::nz` (struct of arrays).
const NZ_FIELDS: usize = 10;

/// What one row's terms read: the mean shares ρ (μ = λ ρ), θ and its
/// constants (empty for Poisson), the dropout logits π (empty unless ZINB).
struct RowParams<'a> {
    inp: &'a Inputs<'a>,
    r: usize,
    lam: f32,
    rho: &'a [f32],
    theta: &'a [f32],
    lte: &'a [f32],
    ite: &'a [f32],
    pi: &'a [f32],
    gene_theta: Option<&'a GeneTheta>,
    /// The feature scaling y of `Front::Softplus`.
    scaling: Option<&'a [f32]>,
}

// Indexed loops over equal-length slices: the form LLVM vectorizes. `row`
// and its helpers are #[inline(always)], so that each SIMD copy of
// `run_row` gets all of them compiled for its instruction set.
#[inline(always)]
fn row<const FMA: bool, const GRAD: bool>(mut job: RowJob, s: &mut Scratch) -> f32 {
    let inp = job.inp;
    let g = inp.n_genes;
    let r = job.r;
    let lam = vmath::exp::<FMA>(inp.log_library[r]);
    for v in [&mut s.f, &mut s.q, &mut s.rho, &mut s.theta, &mut s.lte, &mut s.ite] {
        v.resize(g, 0.0);
    }
    let softplus = inp.front == Front::Softplus;
    let ambient = inp.ambient.filter(|_| softplus).map(|l| l.row(r, g));
    let scaling = inp.scaling.filter(|_| softplus).map(|l| l.row(r, g));
    mean_shares::<FMA>(inp, r, ambient, scaling, s);
    let (theta, lte, ite) = row_theta::<FMA>(inp, r, job.gene_theta, &mut s.theta, &mut s.lte, &mut s.ite);
    let pi = if inp.family == Likelihood::Zinb { &inp.pi_logits[r * g..(r + 1) * g] } else { &[][..] };
    let rp = RowParams { inp, r, lam, rho: &s.rho[..g], theta, lte, ite, pi, gene_theta: job.gene_theta, scaling };

    // Without gradients, the gradient rows are scratch space (the loops
    // stay branch-free).
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
    let (f, q) = (&mut s.f[..g], &mut s.q[..g]);
    zero_case::<FMA, GRAD>(&rp, f, q, gt, gp);
    let total = vmath::sum(f);
    let total = add_nonzeros::<FMA, GRAD>(&rp, &mut s.nz, q, gt, gp, total);
    if let (true, Some(gl), Some(glib)) = (GRAD, job.gl, job.glib) {
        row_gradients(&rp, q, f, &s.base, &s.sig, gl, glib, job.sums, gt);
    }
    total
}

/// The row's mean shares ρ (μ = λ ρ) into `s.rho`; for `Front::Softplus`
/// also softplus(f) + s and σ(f) into `s.base` and `s.sig` (the backward
/// pass reads them).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn mean_shares<const FMA: bool>(
    inp: &Inputs,
    r: usize,
    ambient: Option<&[f32]>,
    scaling: Option<&[f32]>,
    s: &mut Scratch,
) {
    let g = inp.n_genes;
    let logits = &inp.logits[r * g..(r + 1) * g];
    match inp.front {
        // Softmax: ρ = e^(logit − max) / Σ.
        Front::Softmax => {
            let m = vmath::max(logits);
            for (e, &l) in s.rho.iter_mut().zip(logits) {
                *e = vmath::exp::<FMA>(l - m);
            }
            let inv_total = 1.0 / vmath::sum(&s.rho);
            for e in s.rho.iter_mut() {
                *e *= inv_total;
            }
        }
        // ρ = (softplus(f) + s) · y, keeping softplus(f) + s and σ(f).
        Front::Softplus => {
            s.base.resize(g, 0.0);
            s.sig.resize(g, 0.0);
            let (base, sig) = (&mut s.base[..g], &mut s.sig[..g]);
            if inp.bias.is_empty() {
                for k in 0..g {
                    (base[k], sig[k]) = vmath::softplus_sigmoid::<FMA>(logits[k]);
                }
            } else {
                let bias = &inp.bias[..g];
                for k in 0..g {
                    (base[k], sig[k]) = vmath::softplus_sigmoid::<FMA>(logits[k] + bias[k]);
                }
            }
            if let Some(a) = ambient {
                for k in 0..g {
                    base[k] += a[k];
                }
            }
            s.rho[..g].copy_from_slice(base);
            if let Some(y) = scaling {
                let rho = &mut s.rho[..g];
                for k in 0..g {
                    rho[k] *= y[k];
                }
            }
        }
    }
}

/// θ of the row and its constants log(θ + ε) and 1/(θ + ε): the shared
/// per-gene ones where there are, else computed into the three buffers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn row_theta<'a, const FMA: bool>(
    inp: &Inputs,
    r: usize,
    gene_theta: Option<&'a GeneTheta>,
    theta: &'a mut [f32],
    lte: &'a mut [f32],
    ite: &'a mut [f32],
) -> (&'a [f32], &'a [f32], &'a [f32]) {
    let g = inp.n_genes;
    match (inp.family, gene_theta) {
        (Likelihood::Poisson, _) => (&[], &[], &[]),
        (_, Some(gt)) => (&gt.theta, &gt.log_theta_eps, &gt.inv_theta_eps),
        (_, None) => {
            let lt = &inp.log_theta[r * g..(r + 1) * g];
            for k in 0..g {
                let t = vmath::exp::<FMA>(lt[k]);
                theta[k] = t;
                lte[k] = vmath::ln::<FMA>(t + EPS);
                ite[k] = 1.0 / (t + EPS);
            }
            (theta, lte, ite)
        }
    }
}

/// Every entry's terms as if its count were zero (the non-zeros, a
/// minority, are corrected afterwards): the log-likelihood into `f`, and
/// with `GRAD` ∂/∂μ into `q`, θ ∂/∂θ into `gt` and ∂/∂π into `gp`; without,
/// under ZINB, A into `gt` and softplus(A − π) into `gp`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn zero_case<const FMA: bool, const GRAD: bool>(
    rp: &RowParams,
    f: &mut [f32],
    q: &mut [f32],
    gt: &mut [f32],
    gp: &mut [f32],
) {
    let g = rp.inp.n_genes;
    let (lam, rho, theta, lte, ite, pi) = (rp.lam, &rp.rho[..g], rp.theta, rp.lte, rp.ite, rp.pi);
    match rp.inp.family {
        Likelihood::Poisson => {
            for k in 0..g {
                let mu = lam * rho[k];
                f[k] = -mu;
                if GRAD {
                    q[k] = -1.0;
                }
            }
        }
        Likelihood::Nb | Likelihood::Zinb => {
            // The NB part A = θ log((θ + ε)/u) and its derivatives; ZINB then
            // mixes in the dropout in a second loop (two small loops stay in
            // vector registers where one large one did not).
            let (theta, lte, ite, gt) = (&theta[..g], &lte[..g], &ite[..g], &mut gt[..g]);
            for k in 0..g {
                let mu = lam * rho[k];
                let th = theta[k];
                let u = th + mu + EPS;
                let d_log = lte[k] - vmath::ln::<FMA>(u);
                f[k] = th * d_log; // A
                if GRAD {
                    let iu = 1.0 / u;
                    q[k] = -th * iu; // ∂A/∂μ
                    gt[k] = (d_log + th * (ite[k] - iu)) * th; // θ ∂A/∂θ
                }
            }
            if rp.inp.family == Likelihood::Zinb {
                let (pi, gp) = (&pi[..g], &mut gp[..g]);
                for k in 0..g {
                    let p = pi[k];
                    let (sp_t, sig_t) = vmath::softplus_sigmoid::<FMA>(f[k] - p);
                    let (sp_np, sig_np) = vmath::softplus_sigmoid::<FMA>(-p);
                    if GRAD {
                        q[k] *= sig_t;
                        gt[k] *= sig_t;
                        gp[k] = sig_np - sig_t;
                    } else {
                        // A and softplus(A − π), for the non-zeros to read.
                        (gt[k], gp[k]) = (f[k], sp_t);
                    }
                    f[k] = sp_t - sp_np;
                }
            }
        }
    }
}

/// The corrections at the row's non-zeros, added to `total`: the per-gene
/// values gathered into contiguous arrays, the terms computed in one
/// vectorizable loop, the gradients scattered back into `q`, `gt` and `gp`.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[inline(always)]
fn add_nonzeros<const FMA: bool, const GRAD: bool>(
    rp: &RowParams,
    nz: &mut Vec<f32>,
    q: &mut [f32],
    gt: &mut [f32],
    gp: &mut [f32],
    total: f32,
) -> f32 {
    let (inp, r, fam) = (rp.inp, rp.r, rp.inp.family);
    let (lam, rho, theta, lte, ite, pi) = (rp.lam, &rp.rho[..inp.n_genes], rp.theta, rp.lte, rp.ite, rp.pi);
    let (lo, hi) = (inp.counts.indptr[r], inp.counts.indptr[r + 1]);
    let idx = &inp.counts.indices[lo..hi];
    let xs = &inp.counts.values[lo..hi];
    let nnz = idx.len();
    if nnz == 0 {
        return total;
    }
    nz.resize(nnz * NZ_FIELDS, 0.0);
    let (mu_a, rest) = nz.split_at_mut(nnz);
    let (th_a, rest) = rest.split_at_mut(nnz);
    let (lte_a, rest) = rest.split_at_mut(nnz);
    let (ite_a, rest) = rest.split_at_mut(nnz);
    let (pi_a, rest) = rest.split_at_mut(nnz);
    let (lgt_a, rest) = rest.split_at_mut(nnz);
    let (dgt_a, rest) = rest.split_at_mut(nnz);
    let (df_a, rest) = rest.split_at_mut(nnz);
    let (dq_a, rest) = rest.split_at_mut(nnz);
    let (dt_a, _) = rest.split_at_mut(nnz);
    // log Γ(x + θ) − log Γ(θ) left out (see `Inputs::count_terms`).
    let skip = !GRAD && !inp.count_terms && rp.gene_theta.is_some();
    let at_nz = vmath::Indices::new(idx, inp.n_genes);
    vmath::gather(rho, at_nz, mu_a);
    for m in mu_a.iter_mut() {
        *m *= lam;
    }
    if fam != Likelihood::Poisson {
        vmath::gather(theta, at_nz, th_a);
        vmath::gather(lte, at_nz, lte_a);
        vmath::gather(ite, at_nz, ite_a);
        if let (Some(gtc), false) = (rp.gene_theta, skip) {
            vmath::gather(&gtc.lgamma, at_nz, lgt_a);
            if GRAD {
                vmath::gather(&gtc.digamma, at_nz, dgt_a);
            }
        }
    }
    if fam == Likelihood::Zinb {
        vmath::gather(pi, at_nz, pi_a);
        if !GRAD {
            // A and softplus(A − π) from the zero pass (see `zero_case`).
            vmath::gather(gt, at_nz, lte_a);
            vmath::gather(gp, at_nz, ite_a);
        }
    }
    if fam != Likelihood::Poisson && rp.gene_theta.is_none() {
        for i in 0..nnz {
            if GRAD {
                (lgt_a[i], dgt_a[i]) = vmath::lgamma_digamma::<FMA>(th_a[i]);
            } else {
                lgt_a[i] = vmath::lgamma::<FMA>(th_a[i]);
            }
        }
    }
    match fam {
        Likelihood::Poisson => {
            for i in 0..nnz {
                let (x, mu) = (xs[i], mu_a[i]);
                df_a[i] = x * vmath::ln::<FMA>(mu + EPS);
                if GRAD {
                    dq_a[i] = x / (mu + EPS);
                }
            }
        }
        Likelihood::Nb => {
            for i in 0..nnz {
                let (x, mu, th) = (xs[i], mu_a[i], th_a[i]);
                let u = th + mu + EPS;
                let iu = 1.0 / u;
                if GRAD {
                    let im = 1.0 / (mu + EPS);
                    let (lg, dg) = vmath::lgamma_digamma::<FMA>(x + th);
                    df_a[i] = x * vmath::ln::<FMA>((mu + EPS) * iu) + lg - lgt_a[i];
                    dq_a[i] = x * (im - iu);
                    dt_a[i] = (-x * iu + dg - dgt_a[i]) * th;
                } else {
                    df_a[i] = x * vmath::ln::<FMA>((mu + EPS) * iu); // count terms below
                }
            }
        }
        Likelihood::Zinb if GRAD => {
            for i in 0..nnz {
                let (x, mu, th, p) = (xs[i], mu_a[i], th_a[i], pi_a[i]);
                let u = th + mu + EPS;
                let iu = 1.0 / u;
                let im = 1.0 / (mu + EPS);
                let lu = vmath::ln::<FMA>(u);
                let d_log = lte_a[i] - lu;
                let a = th * d_log;
                let (sp_t, sig_t) = vmath::softplus_sigmoid::<FMA>(a - p);
                let keep = 1.0 - sig_t;
                let (lg, dg) = vmath::lgamma_digamma::<FMA>(x + th);
                df_a[i] = -p + a - sp_t + x * vmath::ln::<FMA>((mu + EPS) * iu) + lg - lgt_a[i];
                dq_a[i] = -keep * th * iu + x * (im - iu);
                dt_a[i] = (keep * (d_log + th * (ite_a[i] - iu)) - x * iu + dg - dgt_a[i]) * th;
                // dπ into π's slot, read above.
                pi_a[i] = sig_t - 1.0;
            }
        }
        Likelihood::Zinb => {
            // A and softplus(A − π) are the zero pass's (in `lte_a`, `ite_a`);
            // the count terms below.
            for i in 0..nnz {
                let (x, mu, th, p) = (xs[i], mu_a[i], th_a[i], pi_a[i]);
                let iu = 1.0 / (th + mu + EPS);
                df_a[i] = -p + lte_a[i] - ite_a[i] + x * vmath::ln::<FMA>((mu + EPS) * iu);
            }
        }
    }
    // The values' count terms log Γ(x + θ) − log Γ(θ), added in the order of
    // the full expression; left out for ranking (`Inputs::count_terms`).
    if !GRAD && fam != Likelihood::Poisson && !skip {
        for i in 0..nnz {
            df_a[i] = df_a[i] + vmath::lgamma::<FMA>(xs[i] + th_a[i]) - lgt_a[i];
        }
    }
    let total = total + vmath::sum(df_a);
    if GRAD {
        for (i, &j) in idx.iter().enumerate() {
            let j = j as usize;
            q[j] += dq_a[i];
            if fam != Likelihood::Poisson {
                gt[j] += dt_a[i];
            }
            if fam == Likelihood::Zinb {
                gp[j] += pi_a[i];
            }
        }
    }
    total
}

/// The row's gradients from q = ∂ℓ/∂μ, and its shares of the shared ones
/// (into `sums`). With μ = λ ρ: ∂ℓ/∂log λ = Σ μ q, and the softmax
/// backward ∂ℓ/∂logit_g = μ_g q_g − ρ_g Σ μ q. For the softplus front,
/// with ∂ℓ/∂ρ = λ q: ∂ℓ/∂s = λ q y, ∂ℓ/∂f = λ q y σ(f) and
/// ∂ℓ/∂y = λ q (softplus(f) + s).
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[inline(always)]
fn row_gradients(
    rp: &RowParams,
    q: &[f32],
    f: &mut [f32],
    base: &[f32],
    sig: &[f32],
    gl: &mut [f32],
    glib: &mut [f32],
    mut sums: Option<&mut Sums>,
    gt: &[f32],
) {
    let (inp, r, g) = (rp.inp, rp.r, rp.inp.n_genes);
    let (lam, rho, scaling) = (rp.lam, &rp.rho[..g], rp.scaling);
    let gl = &mut gl[..g];
    for k in 0..g {
        gl[k] = lam * rho[k] * q[k];
    }
    let total_q = vmath::sum(gl);
    glib[0] = total_q;
    match inp.front {
        Front::Softmax => {
            for k in 0..g {
                gl[k] -= rho[k] * total_q;
            }
        }
        Front::Softplus => {
            // ∂ℓ/∂s into f, free since the row's total was taken.
            let (gs, sig, base) = (&mut f[..g], &sig[..g], &base[..g]);
            for k in 0..g {
                gs[k] = lam * q[k];
            }
            if let Some(y) = scaling {
                let sums = sums.as_deref_mut();
                if let (Some(l), Some(sums)) = (inp.scaling, sums.filter(|s| !s.scaling.is_empty())) {
                    let at = l.codes[r] as usize * g;
                    let acc = &mut sums.scaling[at..at + g];
                    for k in 0..g {
                        acc[k] += gs[k] * base[k];
                    }
                }
                for k in 0..g {
                    gs[k] *= y[k];
                }
            }
            for k in 0..g {
                gl[k] = gs[k] * sig[k];
            }
            if let Some(sums) = sums.as_deref_mut() {
                if let Some(l) = inp.ambient.filter(|_| !sums.ambient.is_empty()) {
                    let at = l.codes[r] as usize * g;
                    add(&mut sums.ambient[at..at + g], gs);
                }
            }
        }
    }
    if let Some(sums) = sums {
        if !sums.bias.is_empty() {
            add(&mut sums.bias, gl);
        }
        if let (false, Some(codes)) = (sums.log_theta.is_empty(), inp.theta_codes) {
            let at = codes[r] as usize * g;
            add(&mut sums.log_theta[at..at + g], &gt[..g]);
        }
    }
}

/// to += from, elementwise.
#[inline(always)]
fn add(to: &mut [f32], from: &[f32]) {
    for (t, &f) in to.iter_mut().zip(from) {
        *t += f;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::data::Csr;
    use crate::likelihood::{
        fused_log_kernel_rows, fused_softplus_rows, nb_log_kernel_rows, poisson_log_kernel_rows, zinb_log_kernel_rows,
        Likelihood, PerLevel, RawDecoded, SoftplusDecoded, SparseBatch,
    };
    use tch::{Device, Kind, Tensor};

    /// Counts with zeros, small and large values (up to 5,000) and an empty row.
    pub(crate) fn counts(n: usize, g: usize) -> Csr {
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
    fn both(family: Likelihood, theta_levels: i64) {
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
        let rate = log_library.exp() * logits.softmax(-1, Kind::Float);
        let theta = if theta_levels > 0 { log_theta().exp() } else { log_theta().exp().unsqueeze(0) };
        let reference = match family {
            Likelihood::Nb => nb_log_kernel_rows(&c, &rate, &theta, 1e-8),
            Likelihood::Zinb => zinb_log_kernel_rows(&c, &rate, &theta, &pi, 1e-8),
            Likelihood::Poisson => poisson_log_kernel_rows(&c, &rate, 1e-8),
        };
        let (v0, g0) = grads_of((&reference * &weights).sum(Kind::Float));
        let log_theta = log_theta();
        let raw = RawDecoded {
            family,
            logits: &logits,
            log_library: &log_library,
            log_theta: (family != Likelihood::Poisson).then_some(&log_theta),
            pi_logits: (family == Likelihood::Zinb).then_some(&pi),
        };
        let fused = fused_log_kernel_rows(&c, &raw).expect("applies on CPU f32");
        assert!(reference.allclose(&fused, 1e-4, 1e-2, false), "{family:?} per row: {reference} vs {fused}");
        let (v1, g1) = grads_of((&fused * &weights).sum(Kind::Float));
        assert!((v0 - v1).abs() <= 1e-4 * v0.abs(), "{family:?}: {v0} vs {v1}");
        for (k, (a, b)) in g0.iter().zip(&g1).enumerate() {
            if family == Likelihood::Poisson && k >= 2 || family == Likelihood::Nb && k == 3 {
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
        // For ranking: rows with a shared θ (per gene, or one of a few
        // repeated rows) leave out Σ log Γ(x + θ) − log Γ(θ) over their
        // non-zeros; the others keep the full value.
        let ranked = crate::likelihood::fused_log_kernel_rows_for_ranking(&c, &raw).unwrap();
        let mut dense = vec![0f32; (n * g) as usize];
        for r in 0..n as usize {
            for p in m.indptr[r]..m.indptr[r + 1] {
                dense[r * g as usize + m.indices[p] as usize] = m.values[p];
            }
        }
        let x = Tensor::from_slice(&dense).view([n, g]);
        let th = theta.detach().expand([n, g], false);
        let count_terms = ((&x + &th).lgamma() - th.lgamma()).where_self(&x.gt(0.0), &x.zeros_like()).sum_dim_intlist(
            -1,
            false,
            Kind::Float,
        );
        let full = reference.detach();
        let left_out = &full - &count_terms;
        let shared = |r: i64| family != Likelihood::Poisson && (theta_levels <= 16 || r < 16);
        for r in 0..n {
            let (got, want) = (ranked.double_value(&[r]), if shared(r) { &left_out } else { &full }.double_value(&[r]));
            assert!(
                (got - want).abs() <= 1e-4 * want.abs() + 1e-2,
                "{family:?} {theta_levels} ranking value of row {r}: {got} vs {want} (full {}, count terms {})",
                full.double_value(&[r]),
                count_terms.double_value(&[r])
            );
        }
    }

    #[test]
    fn fused_kernel_matches_the_tensor_path_value_and_gradients() {
        // The generator is global: take a turn with the training tests.
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        for family in [Likelihood::Nb, Likelihood::Zinb, Likelihood::Poisson] {
            both(family, 0);
        }
        for levels in [2, 21] {
            both(Likelihood::Nb, levels);
            both(Likelihood::Zinb, levels);
        }
    }

    /// The softplus front with its output layer, ambient, scaling and θ
    /// tables against the tensor path: values per row, the gradients of the
    /// per-row inputs under unequal row weights, and every gradient under
    /// equal ones (the training loop's mean), with a ridge ρ Σ W² on the
    /// output weight taken by the fused path.
    fn softplus_both(levels: i64, ambient: bool, scaling: bool, ridge: f64) {
        let (n, g, units) = (21i64, 301i64, 7i64);
        tch::manual_seed(5);
        let m = counts(n as usize, g as usize);
        let rows: Vec<usize> = (0..n as usize).collect();
        let c = SparseBatch::from_csr(&m, &rows, Device::Cpu);
        let opts = (Kind::Float, Device::Cpu);
        let hidden = leaf(Tensor::randn([n, units], opts));
        let weight = leaf(Tensor::randn([g, units], opts) * 0.7);
        let bias = leaf(Tensor::randn([g], opts) - 2.0);
        let log_library = leaf(Tensor::randn([n, 1], opts) + 7.0);
        let log_theta = leaf(Tensor::randn([levels, g], opts) * 2.0);
        let beta = leaf(Tensor::randn([levels, g], opts) - 3.0);
        let gamma = leaf(Tensor::randn([levels, g], opts) * 0.3);
        // Levels in a different order for each table.
        let codes = |k: i64| (Tensor::arange(n, (Kind::Int64, Device::Cpu)) * k + 1).remainder(levels);
        let (theta_codes, ambient_codes, scaling_codes) = (codes(1), codes(2), codes(5));
        let params = [&hidden, &weight, &bias, &log_library, &log_theta, &beta, &gamma];
        // The decoder without ambient or scaling; each run adds its own tables.
        let plain = SoftplusDecoded {
            hidden: &hidden,
            weight: &weight,
            bias: &bias,
            log_library: &log_library,
            log_theta: PerLevel { table: &log_theta, codes: &theta_codes },
            ambient: None,
            scaling: None,
            weight_ridge: 0.0,
        };
        let run = |fused: bool, weights: &Tensor| -> (Tensor, Vec<Tensor>) {
            for p in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let s = beta.exp();
            let y = gamma.softplus() / 0.7;
            let rows = if fused {
                let d = SoftplusDecoded {
                    ambient: ambient.then_some(PerLevel { table: &s, codes: &ambient_codes }),
                    scaling: scaling.then_some(PerLevel { table: &y, codes: &scaling_codes }),
                    weight_ridge: ridge,
                    ..plain
                };
                fused_softplus_rows(&c, &d).expect("applies on CPU f32")
            } else {
                let mean = hidden.mm(&weight.tr()).g_add(&bias).softplus();
                let mean = if ambient { mean + s.index_select(0, &ambient_codes) } else { mean };
                let mean = if scaling { mean * y.index_select(0, &scaling_codes) } else { mean };
                let theta = log_theta.index_select(0, &theta_codes).exp();
                nb_log_kernel_rows(&c, &(log_library.exp() * mean), &theta, 1e-8)
            };
            // The rows' log-likelihoods, less the ridge (the fused path adds
            // only its gradient).
            let penalty = if fused { Tensor::zeros([], opts) } else { weight.square().sum(Kind::Float) * ridge };
            ((&rows * weights).sum(Kind::Float) - penalty).backward();
            let grad = |p: &Tensor| if p.grad().defined() { p.grad().copy() } else { p.zeros_like() };
            (rows.detach(), params.iter().map(|p| grad(p)).collect())
        };
        let close = |a: &Tensor, b: &Tensor, what: String| {
            let scale = a.abs().max().double_value(&[]);
            let err = (a - b).abs().max().double_value(&[]);
            assert!(err <= 2e-4 * scale + 1e-5, "{what}: max error {err} at scale {scale}");
        };
        let unequal = Tensor::rand([n], opts) + 0.5;
        let equal = Tensor::full([n], 1.0 / n as f64, opts);
        for (weights, all) in [(&unequal, false), (&equal, true)] {
            let (v0, g0) = run(false, weights);
            let (v1, g1) = run(true, weights);
            assert!(v0.allclose(&v1, 1e-4, 1e-2, false), "per row: {v0} vs {v1}");
            for (k, (a, b)) in g0.iter().zip(&g1).enumerate() {
                if !all && k != 0 && k != 3 {
                    continue; // under unequal weights, only the per-row inputs (hidden, library)
                }
                close(
                    a,
                    b,
                    format!("levels {levels}, ambient {ambient}, scaling {scaling}, ridge {ridge}, gradient {k}, equal {all}"),
                );
            }
        }
        tch::no_grad(|| assert!(!fused_softplus_rows(&c, &plain).unwrap().requires_grad()));
    }

    #[test]
    fn fused_softplus_front_matches_the_tensor_path_value_and_gradients() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        for (levels, ambient, scaling, ridge) in [
            (1, false, false, 0.0),
            (1, true, true, 0.0),
            (3, true, false, 0.0),
            (3, false, true, 0.0),
            (3, true, true, 0.0),
            (3, true, true, 0.37),
        ] {
            softplus_both(levels, ambient, scaling, ridge);
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
            family: Likelihood::Poisson,
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
