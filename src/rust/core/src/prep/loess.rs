//! Local quadratic regression (LOESS, Cleveland & Devlin 1988) with tricube
//! weights, evaluated exactly at every point, as used for the mean–variance
//! trend of the seurat_v3 gene selection (span 0.3, degree 2, no robustness
//! iterations).

use rayon::prelude::*;

/// Fitted values of a degree-2 LOESS of `y` on `x` with the given span.
pub fn loess_quadratic(x: &[f64], y: &[f64], span: f64) -> Vec<f64> {
    let n = x.len();
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let xs: Vec<f64> = order.iter().map(|&k| x[k]).collect();
    let ys: Vec<f64> = order.iter().map(|&k| y[k]).collect();
    let q = ((span * n as f64).floor() as usize).clamp(3.min(n), n);

    let fitted_sorted: Vec<f64> = (0..n).into_par_iter().map(|i| fit_at(&xs, &ys, i, q)).collect();
    let mut fitted = vec![0.0; n];
    for (pos, &k) in order.iter().enumerate() {
        fitted[k] = fitted_sorted[pos];
    }
    fitted
}

/// The q nearest neighbours of sorted point i form a contiguous window.
fn window(xs: &[f64], i: usize, q: usize) -> (usize, usize) {
    let n = xs.len();
    let (mut lo, mut hi) = (i, i); // inclusive
    while hi - lo + 1 < q {
        let left = if lo > 0 { xs[i] - xs[lo - 1] } else { f64::INFINITY };
        let right = if hi + 1 < n { xs[hi + 1] - xs[i] } else { f64::INFINITY };
        if left <= right {
            lo -= 1;
        } else {
            hi += 1;
        }
    }
    (lo, hi)
}

fn fit_at(xs: &[f64], ys: &[f64], i: usize, q: usize) -> f64 {
    let (lo, hi) = window(xs, i, q);
    let x0 = xs[i];
    // Bandwidth: distance to the farthest of the q neighbours, widened a hair
    // so that it keeps a positive weight (as in cloess).
    let h = (x0 - xs[lo]).max(xs[hi] - x0) * 1.000_001;
    // Weighted normal equations of y ≈ b0 + b1 d + b2 d², d = x − x0.
    let mut s = [0.0f64; 5]; // Σw d^k, k = 0..4
    let mut t = [0.0f64; 3]; // Σw y d^k, k = 0..2
    for j in lo..=hi {
        let d = xs[j] - x0;
        let w = if h > 0.0 {
            let u = (d.abs() / h).min(1.0);
            let c = 1.0 - u * u * u;
            c * c * c
        } else {
            1.0
        };
        let (d2, y) = (d * d, ys[j]);
        s[0] += w;
        s[1] += w * d;
        s[2] += w * d2;
        s[3] += w * d2 * d;
        s[4] += w * d2 * d2;
        t[0] += w * y;
        t[1] += w * y * d;
        t[2] += w * y * d2;
    }
    let a = [[s[0], s[1], s[2]], [s[1], s[2], s[3]], [s[2], s[3], s[4]]];
    solve3(a, t).map(|b| b[0]).unwrap_or(t[0] / s[0])
}

/// Solves a 3×3 symmetric system by Cramer's rule; None when near-singular.
fn solve3(a: [[f64; 3]; 3], b: [f64; 3]) -> Option<[f64; 3]> {
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(&a);
    let scale = a[0][0] * a[1][1] * a[2][2];
    if !d.is_finite() || d.abs() <= 1e-12 * scale.abs() || d == 0.0 {
        return None;
    }
    let mut out = [0.0; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut m = a;
        for r in 0..3 {
            m[r][k] = b[r];
        }
        *o = det(&m) / d;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_a_quadratic_exactly() {
        let x: Vec<f64> = (0..200).map(|k| (k as f64 * 0.37).sin() * 3.0).collect();
        let y: Vec<f64> = x.iter().map(|v| 1.0 - 2.0 * v + 0.5 * v * v).collect();
        for (f, t) in loess_quadratic(&x, &y, 0.3).iter().zip(&y) {
            assert!((f - t).abs() < 1e-8, "{f} vs {t}");
        }
    }

    #[test]
    fn smooths_noise_toward_the_trend() {
        // y = x² + alternating ±1 noise; the fit should be much closer to x².
        let x: Vec<f64> = (0..400).map(|k| k as f64 / 100.0).collect();
        let y: Vec<f64> = x.iter().enumerate().map(|(k, v)| v * v + if k % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let f = loess_quadratic(&x, &y, 0.3);
        let err: f64 = f.iter().zip(&x).map(|(f, v)| (f - v * v).abs()).sum::<f64>() / x.len() as f64;
        assert!(err < 0.05, "mean abs error {err}");
    }
}
