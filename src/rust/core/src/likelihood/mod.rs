//! Log-likelihoods of count observation models, elementwise on tensors (any
//! shape, broadcasting), in the numerically stable forms scvi-tools uses.
//! `eps` guards the logarithms against zero means or dispersions; pass 0 for
//! the exact value.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::kernels::fused;

// The minibatch type lives with the data; models import it from here too.
pub use crate::data::SparseBatch;

/// Observation model of the counts, as a model's configuration names it and
/// as the fused kernel evaluates it. Stored in model files by its lowercase
/// name ("nb", "zinb", "poisson"): keep the serde attributes as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Likelihood {
    Nb,
    Zinb,
    Poisson,
}

impl Likelihood {
    pub fn parse(s: &str) -> Option<Likelihood> {
        match s {
            "nb" => Some(Likelihood::Nb),
            "zinb" => Some(Likelihood::Zinb),
            "poisson" => Some(Likelihood::Poisson),
            _ => None,
        }
    }
}

/// Negative binomial with mean `mu` and inverse dispersion `theta` (Hilbe 2011,
/// NB2; variance mu + mu²/theta):
/// log Γ(x+θ) − log Γ(θ) − log Γ(x+1) + θ log(θ/(θ+μ)) + x log(μ/(θ+μ)).
pub fn nb_log_prob(x: &Tensor, mu: &Tensor, theta: &Tensor, eps: f64) -> Tensor {
    nb_log_kernel(x, mu, theta, eps) - (x + 1.0).lgamma()
}

/// `nb_log_prob` without −log Γ(x+1), which does not depend on the model:
/// training drops it and adds it back per cell from the sparse counts.
pub fn nb_log_kernel(x: &Tensor, mu: &Tensor, theta: &Tensor, eps: f64) -> Tensor {
    let log_theta_mu = (theta + mu + eps).log();
    theta * ((theta + eps).log() - &log_theta_mu) + x * ((mu + eps).log() - &log_theta_mu) + (x + theta).lgamma()
        - theta.lgamma()
}

/// Zero-inflated negative binomial; `pi_logits` is the logit of the
/// probability of an extra zero. Zeros: log(π + (1 − π)·NB(0)); others:
/// log(1 − π) + log NB(x), both written with softplus so that large logits of
/// either sign stay finite.
pub fn zinb_log_prob(x: &Tensor, mu: &Tensor, theta: &Tensor, pi_logits: &Tensor, eps: f64) -> Tensor {
    zinb_log_kernel(x, mu, theta, pi_logits, eps) - (x + 1.0).lgamma()
}

/// `zinb_log_prob` without −log Γ(x+1) (zero at x = 0).
pub fn zinb_log_kernel(x: &Tensor, mu: &Tensor, theta: &Tensor, pi_logits: &Tensor, eps: f64) -> Tensor {
    let softplus_neg_pi = (-pi_logits).softplus(); // −log(1 − π)
    let log_theta_mu = (theta + mu + eps).log();
    let pi_theta_log = -pi_logits + theta * ((theta + eps).log() - &log_theta_mu);
    let zero_case = pi_theta_log.softplus() - &softplus_neg_pi;
    let nonzero_case =
        -&softplus_neg_pi + &pi_theta_log + x * ((mu + eps).log() - &log_theta_mu) + (x + theta).lgamma()
            - theta.lgamma();
    let is_zero = x.lt(eps.max(1e-12));
    zero_case.where_self(&is_zero, &nonzero_case)
}

/// Poisson with rate `rate`: x log(rate) − rate − log Γ(x + 1), with 0·log 0 = 0.
pub fn poisson_log_prob(x: &Tensor, rate: &Tensor, eps: f64) -> Tensor {
    poisson_log_kernel(x, rate, eps) - (x + 1.0).lgamma()
}

/// `poisson_log_prob` without −log Γ(x+1).
pub fn poisson_log_kernel(x: &Tensor, rate: &Tensor, eps: f64) -> Tensor {
    x.xlogy(&(rate + eps)) - rate
}

/// Bernoulli on 0/1 data with success logits `logits` (binarized ATAC peaks):
/// x·log σ(l) + (1 − x)·log σ(−l).
pub fn bernoulli_log_prob(x: &Tensor, logits: &Tensor) -> Tensor {
    -(x * (-logits).softplus() + (-x + 1.0) * logits.softplus())
}

/// Σ over genes of `nb_log_kernel` per row: θ log(θ/(θ+μ)) over every
/// entry, the rest at the non-zeros only.
pub fn nb_log_kernel_rows(c: &SparseBatch, mu: &Tensor, theta: &Tensor, eps: f64) -> Tensor {
    let log_theta_mu = (mu + (theta + eps)).log();
    let a = theta * ((theta + eps).log() - &log_theta_mu);
    let dense = a.sum_dim_intlist(-1, false, a.kind());
    dense + c.per_row(&nb_nonzero_terms(c, mu, theta, &log_theta_mu, eps))
}

fn nb_nonzero_terms(c: &SparseBatch, mu: &Tensor, theta: &Tensor, log_theta_mu: &Tensor, eps: f64) -> Tensor {
    let theta_nz = c.at(theta);
    let mu_nz = c.at(mu);
    // log Γ(θ) of a per-gene θ: once per gene (and its digamma in the
    // backward pass), not once per non-zero.
    let lgamma_theta = if theta.size()[0] == 1 { c.at(&theta.lgamma()) } else { theta_nz.lgamma() };
    c.x() * ((mu_nz + eps).log() - c.at(log_theta_mu)) + (c.x() + &theta_nz).lgamma() - lgamma_theta
}

/// Σ over genes of `zinb_log_kernel` per row. With A = θ log(θ/(θ+μ)) and
/// π the dropout logit, zeros give softplus(A − π) − softplus(−π) and
/// non-zeros −softplus(−π) − π + A + (the NB non-zero terms); so the dense
/// part is Σ softplus(A − π) − softplus(−π) over every entry, corrected at
/// the non-zeros by −π + A − softplus(A − π) + the NB non-zero terms.
pub fn zinb_log_kernel_rows(c: &SparseBatch, mu: &Tensor, theta: &Tensor, pi_logits: &Tensor, eps: f64) -> Tensor {
    let log_theta_mu = (mu + (theta + eps)).log();
    let a = theta * ((theta + eps).log() - &log_theta_mu);
    let zero_case = (&a - pi_logits).softplus();
    let dense = (&zero_case - (-pi_logits).softplus()).sum_dim_intlist(-1, false, a.kind());
    let correction =
        -c.at(pi_logits) + c.at(&a) - c.at(&zero_case) + nb_nonzero_terms(c, mu, theta, &log_theta_mu, eps);
    dense + c.per_row(&correction)
}

/// Σ over genes of `poisson_log_kernel` per row: −Σ rate + Σ_nz x log rate.
pub fn poisson_log_kernel_rows(c: &SparseBatch, rate: &Tensor, eps: f64) -> Tensor {
    let dense = -rate.sum_dim_intlist(-1, false, rate.kind());
    dense + c.per_row(&(c.x() * (c.at(rate) + eps).log()))
}

/// A decoder's raw outputs for the fused CPU likelihood: its output `logits`
/// (μ = exp(log_library) · softmax(logits)), log θ ([genes] or [rows, genes];
/// unused for Poisson) and ZINB dropout logits.
pub struct RawDecoded<'a> {
    pub family: Likelihood,
    pub logits: &'a Tensor,
    pub log_library: &'a Tensor,
    pub log_theta: Option<&'a Tensor>,
    pub pi_logits: Option<&'a Tensor>,
}

/// Whether gradients will flow into `t`: it requires them and the graph is
/// being recorded (a parameter keeps `requires_grad` inside `no_grad`, a
/// view of it does not).
fn tracked(t: &Tensor) -> bool {
    t.requires_grad() && (t.numel() == 0 || t.reshape([-1]).narrow(0, 0, 1).requires_grad())
}

fn float_cpu(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float
}

/// A tensor's values as a contiguous flat tensor, out of the graph.
fn flat(t: &Tensor) -> Tensor {
    t.detach().contiguous().reshape([-1])
}

fn empty() -> Tensor {
    Tensor::zeros([0], (Kind::Float, Device::Cpu))
}

thread_local! {
    /// Large CPU buffers of `fused_softplus_rows` kept between calls: a
    /// fresh 10 MB tensor per minibatch comes from the system each time,
    /// and touching its pages cost more than the work written into them.
    static SCRATCH: std::cell::RefCell<Vec<Tensor>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A CPU f32 tensor of shape `size` from the scratch buffers (contents
/// undefined), or a new one.
fn scratch(size: &[i64]) -> Tensor {
    let numel: i64 = size.iter().product();
    SCRATCH
        .with(|s| {
            let mut s = s.borrow_mut();
            let at = s.iter().position(|t| t.numel() as i64 == numel)?;
            Some(s.swap_remove(at).view(size))
        })
        .unwrap_or_else(|| Tensor::empty(size, (Kind::Float, Device::Cpu)))
}

/// Returns `t` to the scratch buffers; nothing else may hold it.
fn unscratch(t: Tensor) {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < 4 {
            s.push(t);
        }
    });
}

fn empty_unless(on: bool, size: &[i64]) -> Tensor {
    if on {
        Tensor::empty(size, (Kind::Float, Device::Cpu))
    } else {
        empty()
    }
}

/// Σ t · grad over the last dimension: the part of a surrogate whose
/// gradient with respect to `t` is `grad` (the surrogate then subtracts its
/// own detached value, so that it adds 0).
fn row_dot(t: &Tensor, grad: &Tensor) -> Tensor {
    // A product and a row sum: their backward is one scaling pass, where a
    // bmm of [1 × g] by [g × 1] took 2.5 times as long forward and back
    // (0.29 against 0.12 ms at 128 × 2,000).
    (t * grad).sum_dim_intlist(-1, false, Kind::Float)
}

/// Σ over genes of the log-likelihood kernel per row (no −log Γ(x+1)), as
/// `nb_log_kernel_rows` and friends, evaluated by the fused kernel with its
/// gradients wired into autograd. `None` when the kernel does not apply (not
/// on the CPU, not f32, or no host copy of the counts): use the tensor path.
pub fn fused_log_kernel_rows(c: &SparseBatch, d: &RawDecoded) -> Option<Tensor> {
    fused_rows(c, d, true)
}

/// `fused_log_kernel_rows` without gradients, for ranking rows that share
/// their counts and θ (a cell's decoded candidates): log Γ(x + θ) − log Γ(θ)
/// is left out where θ is shared (per gene or per batch), so each value is
/// the log-likelihood up to a term of the row's counts and θ alone.
pub fn fused_log_kernel_rows_for_ranking(c: &SparseBatch, d: &RawDecoded) -> Option<Tensor> {
    fused_rows(c, d, false)
}

fn fused_rows(c: &SparseBatch, d: &RawDecoded, count_terms: bool) -> Option<Tensor> {
    let host = c.host.as_ref()?;
    let parts = [Some(d.logits), Some(d.log_library), d.log_theta, d.pi_logits];
    if !parts.iter().flatten().all(|t| float_cpu(t)) {
        return None;
    }
    let (n, g) = d.logits.size2().ok()?;
    if n == 0 || g == 0 {
        return None;
    }
    let logits = flat(d.logits);
    let log_library = flat(d.log_library);
    let log_theta = d.log_theta.map(flat).unwrap_or_else(empty);
    let pi = d.pi_logits.map(flat).unwrap_or_else(empty);
    let shared_theta = log_theta.numel() == g as usize;
    // Values for ranking come without gradients.
    let want_grad = count_terms && parts.iter().flatten().any(|t| t.requires_grad());
    let value = Tensor::empty([n], (Kind::Float, Device::Cpu));
    let g_logits = empty_unless(want_grad, &[n, g]);
    let g_lib = empty_unless(want_grad, &[n]);
    let g_theta = empty_unless(want_grad && d.log_theta.is_some(), &[n, g]);
    let g_pi = empty_unless(want_grad && d.pi_logits.is_some(), &[n, g]);
    // SAFETY: each slice covers exactly its tensor's contiguous f32 storage,
    // the tensors live until the end of this function and none is aliased.
    unsafe {
        let inputs = fused::Inputs {
            family: d.family,
            front: fused::Front::Softmax,
            n_genes: g as usize,
            logits: view(&logits),
            log_library: view(&log_library),
            log_theta: view(&log_theta),
            theta_codes: None,
            pi_logits: view(&pi),
            ambient: None,
            scaling: None,
            bias: &[],
            counts: fused::Rows { indptr: &host.indptr, indices: &host.indices, values: &host.values },
            count_terms,
        };
        let grads = want_grad.then(|| fused::Grads {
            logits: view_mut(&g_logits),
            log_library: view_mut(&g_lib),
            log_theta: view_mut(&g_theta),
            pi_logits: view_mut(&g_pi),
            shared: Default::default(),
        });
        fused::log_likelihood(&inputs, view_mut(&value), grads);
    }
    if !want_grad {
        return Some(value);
    }
    // A surrogate whose value is 0 and whose gradient is the kernel's.
    let mut s = row_dot(d.logits, &g_logits) + d.log_library.reshape([n]) * &g_lib;
    if let Some(t) = d.log_theta.filter(|t| t.requires_grad()) {
        s += if shared_theta { g_theta.mv(&t.reshape([g])) } else { row_dot(t, &g_theta) };
    }
    if let Some(p) = d.pi_logits.filter(|t| t.requires_grad()) {
        s += row_dot(p, &g_pi);
    }
    Some(value + (&s - s.detach()))
}

/// # Safety
/// `t` must be a contiguous CPU f32 tensor that outlives the slice and is
/// not written through another path meanwhile.
unsafe fn view(t: &Tensor) -> &[f32] {
    std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel())
}

/// # Safety
/// As `view`, and no other slice of `t` may be alive.
#[allow(clippy::mut_from_ref)]
unsafe fn view_mut(t: &Tensor) -> &mut [f32] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel())
}

/// A per-feature table with one row per level ([levels, genes]) and each
/// cell's level ([cells], int64).
#[derive(Clone, Copy)]
pub struct PerLevel<'a> {
    pub table: &'a Tensor,
    pub codes: &'a Tensor,
}

/// The last layer of a regularizedvi decoder and what follows it, for the
/// fused NB likelihood: f = hidden · weightᵀ + bias and
/// μ = exp(log_library) · (softplus(f) + s) · y, with the ambient background
/// s, the feature scaling y and log θ per level.
pub struct SoftplusDecoded<'a> {
    /// The decoder's last hidden layer, [cells, units].
    pub hidden: &'a Tensor,
    /// The output layer's weight [genes, units] and bias [genes].
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    /// [cells, 1].
    pub log_library: &'a Tensor,
    pub log_theta: PerLevel<'a>,
    pub ambient: Option<PerLevel<'a>>,
    pub scaling: Option<PerLevel<'a>>,
    /// ρ of a ridge penalty ρ · Σ weight² that the caller's loss adds to
    /// every row: its gradient is added to the weight's here (in the same
    /// pass as the output layer's), its value left to the caller.
    pub weight_ridge: f64,
}

/// Σ over genes of the NB log-likelihood kernel per row for
/// `SoftplusDecoded`, by the fused kernel; `None` where it does not apply.
///
/// The output layer is part of the fused step: its gradients (two GEMMs)
/// are taken in the forward pass from the kernel's ∂/∂f, so that no
/// [cells × genes] tensor enters the autograd graph. The gradients of the
/// per-row inputs (`hidden`, `log_library`) are exact for any weighting of
/// the rows; those of the shared parameters (weight, bias and the per-level
/// tables) are summed over rows inside the kernel and spread evenly over
/// them, so they are exact when the rows enter the loss with equal weights,
/// as in the training loop's minibatch mean.
pub fn fused_softplus_rows(c: &SparseBatch, d: &SoftplusDecoded) -> Option<Tensor> {
    let host = c.host.as_ref()?;
    let tables = [Some(d.log_theta), d.ambient, d.scaling];
    let floats =
        [d.hidden, d.weight, d.bias, d.log_library].into_iter().chain(tables.iter().flatten().map(|l| l.table));
    if !floats.clone().all(float_cpu) || !tables.iter().flatten().all(|l| l.codes.device() == Device::Cpu) {
        return None;
    }
    let (n, _) = d.hidden.size2().ok()?;
    let (g, _) = d.weight.size2().ok()?;
    if n == 0 || g == 0 {
        return None;
    }
    let want_grad = floats.clone().any(tracked);
    // f without its bias: the kernel adds the bias as it reads f.
    let f = scratch(&[n, g]);
    let _ = tch::no_grad(|| d.hidden.detach().mm_out(&f, &d.weight.detach().tr()));
    let bias = flat(d.bias);
    let log_library = flat(d.log_library);
    let values = |l: &Option<PerLevel>| l.map(|l| (flat(l.table), l.codes.to_kind(Kind::Int64).contiguous()));
    let (theta, ambient, scaling) = (values(&Some(d.log_theta)), values(&d.ambient), values(&d.scaling));
    let want = |l: &Option<PerLevel>| want_grad && l.is_some_and(|l| tracked(l.table));
    let table_grad = |l: &Option<PerLevel>| empty_unless(want(l), &[l.map_or(0, |l| l.table.numel() as i64)]);
    let value = Tensor::empty([n], (Kind::Float, Device::Cpu));
    let g_f = if want_grad { scratch(&[n, g]) } else { empty() };
    let g_lib = empty_unless(want_grad, &[n]);
    let g_bias = empty_unless(want_grad && tracked(d.bias), &[g]);
    let (g_theta, g_ambient, g_scaling) =
        (table_grad(&Some(d.log_theta)), table_grad(&d.ambient), table_grad(&d.scaling));
    // SAFETY: as in `fused_log_kernel_rows`; the codes are contiguous int64.
    unsafe {
        let codes = |t: &Tensor| std::slice::from_raw_parts(t.data_ptr() as *const i64, t.numel());
        fn levels(v: &Option<(Tensor, Tensor)>) -> Option<fused::Levels<'_>> {
            // SAFETY: as above.
            v.as_ref().map(|(t, c)| unsafe {
                fused::Levels {
                    table: view(t),
                    codes: std::slice::from_raw_parts(c.data_ptr() as *const i64, c.numel()),
                }
            })
        }
        let (theta_table, theta_codes) = theta.as_ref().expect("θ is given");
        let inputs = fused::Inputs {
            family: Likelihood::Nb,
            front: fused::Front::Softplus,
            n_genes: g as usize,
            logits: view(&f),
            log_library: view(&log_library),
            log_theta: view(theta_table),
            theta_codes: Some(codes(theta_codes)),
            pi_logits: &[],
            bias: view(&bias),
            ambient: levels(&ambient),
            scaling: levels(&scaling),
            counts: fused::Rows { indptr: &host.indptr, indices: &host.indices, values: &host.values },
            count_terms: true,
        };
        let grads = want_grad.then(|| fused::Grads {
            logits: view_mut(&g_f),
            log_library: view_mut(&g_lib),
            log_theta: &mut [],
            pi_logits: &mut [],
            shared: fused::SharedGrads {
                bias: view_mut(&g_bias),
                ambient: view_mut(&g_ambient),
                scaling: view_mut(&g_scaling),
                log_theta: view_mut(&g_theta),
            },
        });
        fused::log_likelihood(&inputs, view_mut(&value), grads);
    }
    unscratch(f);
    if !want_grad {
        return Some(value);
    }
    // ∂/∂hidden = ∂/∂f · weight and ∂/∂weight = (∂/∂f)ᵀ · hidden, now.
    let mut per_row = d.log_library.reshape([n]) * &g_lib;
    let mut shared = Tensor::zeros([], (Kind::Float, Device::Cpu));
    if tracked(d.hidden) {
        per_row += row_dot(d.hidden, &g_f.mm(&d.weight.detach()));
    }
    if tracked(d.weight) {
        let g_w = g_f.tr().mm(&d.hidden.detach()).contiguous();
        if d.weight_ridge != 0.0 {
            // The rows' loss holds −value + ρ Σ W², and the weight's
            // gradient reaches the loss as −g_w / n (below): ρ's gradient
            // 2ρW is −(−2ρn W) / n.
            let w = d.weight.detach().contiguous();
            let k = (2.0 * d.weight_ridge * n as f64) as f32;
            // SAFETY: two contiguous f32 tensors of the weight's shape; g_w
            // is a fresh product, not aliased.
            let (gs, ws) = unsafe { (view_mut(&g_w), view(&w)) };
            sub_scaled(gs, ws, k);
        }
        // A dot product: no [genes × units] product tensor, forward or back.
        shared += d.weight.reshape([-1]).dot(&g_w.reshape([-1]));
    }
    if g_bias.numel() > 0 {
        shared += (d.bias * &g_bias).sum(Kind::Float);
    }
    for (l, gr) in [(Some(d.log_theta), &g_theta), (d.ambient, &g_ambient), (d.scaling, &g_scaling)] {
        if let (Some(l), true) = (l, gr.numel() > 0) {
            shared += (l.table.reshape([-1]) * gr).sum(Kind::Float);
        }
    }
    unscratch(g_f);
    let s = per_row + shared / n as f64;
    Some(value + (&s - s.detach()))
}

/// g −= k · w, elementwise.
#[inline(always)]
fn sub_scaled_body(g: &mut [f32], w: &[f32], k: f32) {
    g.iter_mut().zip(w).for_each(|(g, &w)| *g -= k * w);
}

crate::kernels::simd::wide_copies! {
    fn sub_scaled(g: &mut [f32], w: &[f32], k: f32) = sub_scaled_body
}

#[cfg(test)]
mod tests {
    use super::*;
    use statrs::distribution::{Discrete, NegativeBinomial, Poisson};
    use tch::Kind;

    fn t(v: f64) -> Tensor {
        Tensor::from(v).to_kind(Kind::Double)
    }

    fn value(t: Tensor) -> f64 {
        t.double_value(&[])
    }

    const XS: [f64; 6] = [0.0, 1.0, 5.0, 37.0, 1000.0, 100000.0];
    const MUS: [f64; 5] = [1e-3, 0.5, 10.0, 2500.0, 1e6];
    const THETAS: [f64; 5] = [1e-4, 0.1, 1.0, 30.0, 1e4];

    fn close(a: f64, b: f64, what: &str) {
        let tol = 1e-9 * (1.0 + b.abs());
        assert!((a - b).abs() <= tol, "{what}: {a} vs {b}");
    }

    #[test]
    fn negative_binomial_matches_statrs_on_a_grid() {
        for &x in &XS {
            for &mu in &MUS {
                for &theta in &THETAS {
                    let want = NegativeBinomial::new(theta, theta / (theta + mu)).unwrap().ln_pmf(x as u64);
                    let got = value(nb_log_prob(&t(x), &t(mu), &t(theta), 0.0));
                    close(got, want, &format!("NB x={x} mu={mu} theta={theta}"));
                }
            }
        }
    }

    #[test]
    fn zero_inflated_negative_binomial_matches_its_definition() {
        for &x in &XS {
            for &mu in &MUS {
                for &theta in &THETAS {
                    for &logit in &[-8.0f64, 0.0, 3.0] {
                        let pi = 1.0 / (1.0 + (-logit).exp());
                        let nb = NegativeBinomial::new(theta, theta / (theta + mu)).unwrap();
                        let want = if x == 0.0 {
                            (pi + (1.0 - pi) * nb.pmf(0)).ln()
                        } else {
                            (1.0 - pi).ln() + nb.ln_pmf(x as u64)
                        };
                        let got = value(zinb_log_prob(&t(x), &t(mu), &t(theta), &t(logit), 0.0));
                        close(got, want, &format!("ZINB x={x} mu={mu} theta={theta} logit={logit}"));
                    }
                }
            }
        }
    }

    #[test]
    fn poisson_and_bernoulli_match_statrs() {
        for &x in &XS {
            for &mu in &MUS {
                let want = Poisson::new(mu).unwrap().ln_pmf(x as u64);
                close(value(poisson_log_prob(&t(x), &t(mu), 0.0)), want, &format!("Poisson x={x} mu={mu}"));
            }
        }
        assert_eq!(value(poisson_log_prob(&t(0.0), &t(0.0), 0.0)), 0.0); // 0·log 0 = 0
                                                                         // log σ(l) = −softplus(−l), evaluated stably for large |l|
        let softplus = |v: f64| if v > 0.0 { v + (-v).exp().ln_1p() } else { v.exp().ln_1p() };
        for &l in &[-30.0f64, -1.0, 0.0, 2.0, 40.0] {
            close(value(bernoulli_log_prob(&t(1.0), &t(l))), -softplus(-l), "Bernoulli 1");
            close(value(bernoulli_log_prob(&t(0.0), &t(l))), -softplus(l), "Bernoulli 0");
        }
    }

    #[test]
    fn row_sums_over_non_zeros_equal_the_dense_kernels() {
        use crate::data::Csr;
        // 3 cells x 4 genes with zeros, a large count and an empty-ish row.
        let m = Csr {
            n_rows: 3,
            n_cols: 4,
            indptr: vec![0, 2, 3, 6],
            indices: vec![0, 3, 2, 0, 1, 3],
            values: vec![1., 250., 3., 7., 1., 2.],
        };
        let rows = [2usize, 0, 1];
        let c = SparseBatch::from_csr(&m, &rows, tch::Device::Cpu);
        let x = crate::data::rows_to_tensor(&m, &rows, tch::Device::Cpu).to_kind(Kind::Double);
        let c = SparseBatch::from_tensors(
            c.flat().shallow_clone(),
            c.gene().shallow_clone(),
            c.row().shallow_clone(),
            c.x().to_kind(Kind::Double),
            c.n_rows,
            None,
        );
        let mu = Tensor::from_slice(&[0.5f64, 2., 40., 1e-3, 3., 0.2, 9., 300., 1., 1., 1., 1.]).view([3, 4]);
        let pi = Tensor::from_slice(&[-2.0f64, 0., 1., 5., -8., 0.3, 0.1, -1., 2., 2., -3., 0.]).view([3, 4]);
        let close = |a: Tensor, b: Tensor| {
            let d = (a - &b).abs().max().double_value(&[]);
            assert!(d < 1e-9 * (1.0 + b.abs().max().double_value(&[])), "difference {d}");
        };
        for theta in [
            Tensor::from_slice(&[0.3f64, 2., 15., 1e-3]).view([1, 4]),
            Tensor::from_slice(&[0.3f64, 2., 15., 1e-3, 1., 1., 4., 0.1, 9., 0.5, 2., 3.]).view([3, 4]),
        ] {
            let sum = |t: Tensor| t.sum_dim_intlist(-1, false, Kind::Double);
            close(nb_log_kernel_rows(&c, &mu, &theta, 1e-8), sum(nb_log_kernel(&x, &mu, &theta, 1e-8)));
            close(zinb_log_kernel_rows(&c, &mu, &theta, &pi, 1e-8), sum(zinb_log_kernel(&x, &mu, &theta, &pi, 1e-8)));
            close(poisson_log_kernel_rows(&c, &mu, 1e-8), sum(poisson_log_kernel(&x, &mu, 1e-8)));
        }
    }

    #[test]
    fn the_likelihood_keeps_its_names_in_model_files() {
        // Model files store the configuration as JSON: these strings are a file format.
        for (l, name) in [(Likelihood::Nb, "nb"), (Likelihood::Zinb, "zinb"), (Likelihood::Poisson, "poisson")] {
            assert_eq!(serde_json::to_string(&l).unwrap(), format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Likelihood>(&format!("\"{name}\"")).unwrap(), l);
            assert_eq!(Likelihood::parse(name), Some(l));
        }
        assert_eq!(Likelihood::parse("gaussian"), None);
    }

    #[test]
    fn eps_keeps_zero_means_finite_and_shapes_broadcast() {
        let x = Tensor::from_slice(&[0.0f32, 3.0, 0.0, 1.0]).view([2, 2]);
        let mu = Tensor::from_slice(&[0.0f32, 2.0]).view([1, 2]);
        let theta = Tensor::from_slice(&[1.0f32, 1e-6]).view([1, 2]);
        let nb = nb_log_prob(&x, &mu, &theta, 1e-8);
        assert_eq!(nb.size(), vec![2, 2]);
        assert!(bool::try_from(nb.isfinite().all()).unwrap());
        let z = zinb_log_prob(&x, &mu, &theta, &Tensor::from(50.0f32), 1e-8);
        assert!(bool::try_from(z.isfinite().all()).unwrap());
    }
}
