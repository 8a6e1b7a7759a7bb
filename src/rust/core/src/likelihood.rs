//! Log-likelihoods of count observation models, elementwise on tensors (any
//! shape, broadcasting), in the numerically stable forms scvi-tools uses.
//! `eps` guards the logarithms against zero means or dispersions; pass 0 for
//! the exact value.

use tch::Tensor;

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
    let nonzero_case = -&softplus_neg_pi + &pi_theta_log + x * ((mu + eps).log() - &log_theta_mu)
        + (x + theta).lgamma()
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
