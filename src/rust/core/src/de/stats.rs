//! The decision rules of Bayesian differential expression, on plain
//! numbers: the pseudocount of the log fold change, the threshold δ of a
//! meaningful change, the posterior expected FDR rule, and per-gene
//! summaries of an LFC posterior (from draws, or Gaussian).

use statrs::distribution::{ContinuousCDF, Normal};

/// Quantile `p` of `v` with linear interpolation between order statistics
/// (type 7, numpy's default). Reorders `v`. NaN for an empty slice.
pub fn quantile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let h = p.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let k = h.floor() as usize;
    let (_, lo, upper) = v.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    let lo = *lo;
    let frac = h - k as f64;
    if frac == 0.0 || upper.is_empty() {
        return lo;
    }
    let hi = upper.iter().copied().fold(f64::INFINITY, f64::min);
    lo + frac * (hi - lo)
}

/// Genes called DE by the posterior expected FDR rule (Boyeau et al.
/// 2019): sort genes by `proba_de`, decreasing, and call the top k for the
/// largest k whose mean posterior probability of being wrong,
/// mean(1 − p) over the k, is at most `target`.
pub fn fdr_calls(proba_de: &[f64], target: f64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..proba_de.len()).collect();
    order.sort_by(|&a, &b| proba_de[b].total_cmp(&proba_de[a]));
    let (mut wrong, mut k) = (0.0, 0);
    for (i, &g) in order.iter().enumerate() {
        wrong += 1.0 - proba_de[g];
        if wrong / (i + 1) as f64 <= target {
            k = i + 1;
        }
    }
    let mut calls = vec![false; proba_de.len()];
    for &g in &order[..k] {
        calls[g] = true;
    }
    calls
}

/// Means of a three-component Gaussian mixture fitted to `x` by EM,
/// sorted, started as scikit-learn's `GaussianMixture` is (its default
/// `init_params = "kmeans"`): k-means (here 1-d Lloyd from the 1/6, 1/2 and
/// 5/6 quantiles, deterministic) gives hard responsibilities, one M step
/// gives the start. Variances are floored by 1e-6 (`reg_covar`); EM stops
/// when the mean log-likelihood per point changes by less than 1e-3 (`tol`)
/// or after 100 iterations (`max_iter`). Starting from the quantiles with the
/// overall variance instead can end in a different optimum, with the two
/// outer components pulled into the bulk of unchanged genes.
pub fn gmm3_means(x: &[f64]) -> [f64; 3] {
    let n = x.len() as f64;
    let mut sorted = x.to_vec();
    let mut centre = [1.0 / 6.0, 0.5, 5.0 / 6.0].map(|p| quantile(&mut sorted, p));
    let nearest = |c: &[f64; 3], v: f64| (0..3).min_by(|&a, &b| (v - c[a]).abs().total_cmp(&(v - c[b]).abs())).unwrap();
    let mut label: Vec<usize> = x.iter().map(|&v| nearest(&centre, v)).collect();
    for _ in 0..300 {
        let mut sum = [0.0f64; 3];
        let mut count = [0usize; 3];
        for (&l, &v) in label.iter().zip(x) {
            sum[l] += v;
            count[l] += 1;
        }
        for k in 0..3 {
            if count[k] > 0 {
                centre[k] = sum[k] / count[k] as f64;
            }
        }
        let next: Vec<usize> = x.iter().map(|&v| nearest(&centre, v)).collect();
        if next == label {
            break;
        }
        label = next;
    }
    let mut resp: Vec<[f64; 3]> = label.iter().map(|&l| std::array::from_fn(|k| f64::from(u8::from(k == l)))).collect();
    let (mut mu, mut s2, mut w) = ([0.0f64; 3], [0.0f64; 3], [0.0f64; 3]);
    let m_step = |resp: &[[f64; 3]], mu: &mut [f64; 3], s2: &mut [f64; 3], w: &mut [f64; 3]| {
        for k in 0..3 {
            let nk: f64 = resp.iter().map(|r| r[k]).sum::<f64>() + 1e-12;
            mu[k] = resp.iter().zip(x).map(|(r, v)| r[k] * v).sum::<f64>() / nk;
            s2[k] = resp.iter().zip(x).map(|(r, v)| r[k] * (v - mu[k]).powi(2)).sum::<f64>() / nk + 1e-6;
            w[k] = nk / n;
        }
    };
    m_step(&resp, &mut mu, &mut s2, &mut w);
    let mut last = f64::NEG_INFINITY;
    for _ in 0..100 {
        // E step (log-sum-exp per point).
        let mut loglik = 0.0;
        for (r, &v) in resp.iter_mut().zip(x) {
            let l: [f64; 3] = std::array::from_fn(|k| {
                w[k].ln() - 0.5 * ((2.0 * std::f64::consts::PI * s2[k]).ln() + (v - mu[k]).powi(2) / s2[k])
            });
            let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = l.iter().map(|a| (a - m).exp()).sum();
            loglik += m + z.ln();
            *r = std::array::from_fn(|k| (l[k] - m).exp() / z);
        }
        m_step(&resp, &mut mu, &mut s2, &mut w);
        if (loglik / n - last).abs() < 1e-3 {
            break;
        }
        last = loglik / n;
    }
    mu.sort_by(f64::total_cmp);
    mu
}

/// Smallest |LFC| that counts as a change, estimated from the genes' mean
/// LFCs as scvi-tools does: fit a three-component Gaussian mixture (down,
/// unchanged, up) and take 0.6 × the mean absolute value of the two
/// extreme modes, but at least `floor`.
pub fn estimate_delta(lfc_means: &[f64], floor: f64) -> f64 {
    let finite: Vec<f64> = lfc_means.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.len() < 3 {
        return floor;
    }
    let m = gmm3_means(&finite);
    (0.6 * (m[0].abs() + m[2].abs()) / 2.0).max(floor)
}

/// Pseudocount ε of log2(ρ + ε) (scvi-tools' rule, `estimate_pseudocounts_offset`
/// in 1.4.2): for each group, the 0.9-quantile, over the genes barely
/// detected in that group (`low`), of the largest scale any draw gave them,
/// an estimate of the scale the model assigns to genes that are not there
/// (1e-10 for a group without such genes); ε is the larger of the two
/// groups', divided by the number of genes, and at least 1e-10.
pub fn pseudocount(max_scale1: &[f64], low1: &[bool], max_scale2: &[f64], low2: &[bool]) -> f64 {
    let one = |m: &[f64], low: &[bool]| {
        let mut v: Vec<f64> = m.iter().zip(low).filter(|(_, &l)| l).map(|(&s, _)| s).collect();
        if v.is_empty() {
            1e-10
        } else {
            quantile(&mut v, 0.9)
        }
    };
    (one(max_scale1, low1).max(one(max_scale2, low2)) / max_scale1.len().max(1) as f64).max(1e-10)
}

/// Bayes factor of a probability: log(p / (1 − p)), guarded by 1e-8 as
/// scvi-tools does.
pub fn bayes_factor(p: f64) -> f64 {
    (p + 1e-8).ln() - (1.0 - p + 1e-8).ln()
}

/// Summary of one gene's LFC posterior.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LfcSummary {
    pub mean: f64,
    pub median: f64,
    pub sd: f64,
    pub lower: f64,
    pub upper: f64,
    pub min: f64,
    pub max: f64,
    /// max(P(LFC ≥ δ), P(LFC ≤ −δ)).
    pub proba_de: f64,
}

/// Summary of LFC draws `v` (reordered) for threshold `delta`: mean,
/// median, population sd, 95% equal-tailed interval, range, and the
/// probability of a change of at least δ in either direction.
pub fn summarize_draws(v: &mut [f64], delta: f64) -> LfcSummary {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let up = v.iter().filter(|&&x| x >= delta).count() as f64 / n;
    let down = v.iter().filter(|&&x| x <= -delta).count() as f64 / n;
    let (min, max) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    LfcSummary {
        mean,
        median: quantile(v, 0.5),
        sd,
        lower: quantile(v, 0.025),
        upper: quantile(v, 0.975),
        min,
        max,
        proba_de: up.max(down),
    }
}

/// Summary of a Gaussian LFC posterior N(mean, sd²) for threshold `delta`
/// (the MC-dropout posterior); the range is not defined (NaN).
pub fn summarize_normal(mean: f64, sd: f64, delta: f64) -> LfcSummary {
    let (up, down) = if sd > 0.0 && sd.is_finite() {
        let z = Normal::new(0.0, 1.0).expect("standard normal");
        (z.sf((delta - mean) / sd), z.cdf((-delta - mean) / sd))
    } else {
        ((mean >= delta) as u8 as f64, (mean <= -delta) as u8 as f64)
    };
    const Z975: f64 = 1.959_963_984_540_054;
    LfcSummary {
        mean,
        median: mean,
        sd,
        lower: mean - Z975 * sd,
        upper: mean + Z975 * sd,
        min: f64::NAN,
        max: f64::NAN,
        proba_de: up.max(down),
    }
}
