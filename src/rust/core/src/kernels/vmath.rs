//! Single-precision elementary functions written without branches or libm
//! calls, so that loops over slices that use them compile to SIMD code (the
//! fused likelihood kernel evaluates several per count entry). Accuracy: a few
//! ulp for `exp`, `ln`, `log1p`; about 1e-6 relative for `lgamma` and
//! `digamma` on positive arguments (the tests check each against f64 std).
//!
//! The polynomials are the classic minimax fits of the Cephes library
//! (S. L. Moshier, "Methods and Programs for Mathematical Functions", 1989);
//! lgamma and digamma use the Stirling / de Moivre asymptotic series after
//! shifting small arguments up by 8.

// The published coefficients, digits as printed, though f32 keeps fewer.
#![allow(clippy::excessive_precision)]

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that n · LN2_HI is exact for the exponents used.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it rounds an f32 of magnitude < 2^22 to an integer.
const ROUND: f32 = 12_582_912.0;

use super::simd::madd;

/// e^x; arguments are clamped to [−87, 88] (so e^x is never 0 or ∞), NaN stays NaN.
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, read from t's low mantissa bits.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO; // |r| ≤ ln 2 / 2
    let m = |a: f32, c: f32| madd::<FMA>(a, r, c);
    let p = m(m(m(m(m(1.987_569_2e-4, 1.398_199_9e-3), 8.333_452e-3), 4.166_579_6e-2), 1.666_666_5e-1), 5.000_000_1e-1);
    let e = madd::<FMA>(p, r * r, r) + 1.0;
    e * f32::from_bits((ni.wrapping_add(127) << 23) as u32)
}

/// Natural logarithm: −∞ at 0, NaN below 0 or at NaN, ∞ at ∞.
#[inline(always)]
pub fn ln<const FMA: bool>(x: f32) -> f32 {
    let b = x.to_bits();
    // x = m · 2^e with m in [0.5, 1) (normal numbers).
    let e = ((b >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((b & 0x007f_ffff) | 0x3f00_0000);
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    let e = (e - i32::from(small)) as f32;
    let f = if small { m + m - 1.0 } else { m - 1.0 };
    let z = f * f;
    let m = |a: f32, c: f32| madd::<FMA>(a, f, c);
    let p = m(
        m(
            m(
                m(
                    m(m(m(m(7.037_683_6e-2, -1.151_461e-1), 1.167_699_9e-1), -1.242_014_1e-1), 1.424_932_3e-1),
                    -1.666_805_8e-1,
                ),
                2.000_071_4e-1,
            ),
            -2.499_999_4e-1,
        ),
        3.333_333_1e-1,
    ) * f
        * z;
    let y = f + (p + e * LN2_LO - 0.5 * z) + e * LN2_HI;
    // Zero, negative, subnormal-free inputs only above; the edges by select.
    let y = if x < f32::MIN_POSITIVE {
        if x == 0.0 {
            f32::NEG_INFINITY
        } else {
            f32::NAN
        }
    } else {
        y
    };
    let y = if x == f32::INFINITY { x } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// ln(1 + y) for y ≥ −1, accurate for tiny y (Goldberg's correction).
#[inline(always)]
pub fn log1p<const FMA: bool>(y: f32) -> f32 {
    let u = 1.0 + y;
    let d = u - 1.0;
    if d == 0.0 {
        y
    } else {
        ln::<FMA>(u) * (y / d)
    }
}

/// softplus(t) = ln(1 + e^t) and the logistic σ(t) = its derivative, sharing one exp.
#[inline(always)]
pub fn softplus_sigmoid<const FMA: bool>(t: f32) -> (f32, f32) {
    let e = exp::<FMA>(-t.abs());
    let sp = t.max(0.0) + log1p::<FMA>(e);
    let s = 1.0 / (1.0 + e);
    let sig = if t >= 0.0 { s } else { e * s };
    (if t.is_nan() { t } else { sp }, sig)
}

const HALF_LN_2PI: f32 = 0.918_938_5;

/// log Γ(z) and ψ(z) = d log Γ(z) / dz for z > 0, sharing their work:
/// arguments below 8 are shifted up by 8 with P = z (z + 1) ⋯ (z + 7),
/// log Γ(z) = log Γ(z + 8) − log P and ψ(z) = ψ(z + 8) − P′ / P.
#[inline(always)]
pub fn lgamma_digamma<const FMA: bool>(z: f32) -> (f32, f32) {
    let small = z < 8.0;
    // P and its derivative by the product rule, one factor at a time.
    let (mut p, mut dp) = (z, 1.0f32);
    for k in 1..8 {
        let f = z + k as f32;
        dp = dp * f + p;
        p *= f;
    }
    // Only used where z < 8, so P stays finite there.
    let (p, dp) = if small { (p, dp) } else { (1.0, 0.0) };
    let w = if small { z + 8.0 } else { z };
    let iw = 1.0 / w;
    let iw2 = iw * iw;
    let lw = ln::<FMA>(w);
    let series = iw * (1.0 / 12.0 - iw2 * (1.0 / 360.0 - iw2 * (1.0 / 1260.0)));
    let lg = (w - 0.5) * lw - w + HALF_LN_2PI + series - ln::<FMA>(p);
    let dg = lw - 0.5 * iw - iw2 * (1.0 / 12.0 - iw2 * (1.0 / 120.0 - iw2 * (1.0 / 252.0))) - dp / p;
    (lg, dg)
}

/// log Γ(z) for z > 0.
#[inline(always)]
pub fn lgamma<const FMA: bool>(z: f32) -> f32 {
    lgamma_digamma::<FMA>(z).0
}

/// ψ(z) for z > 0.
#[inline(always)]
pub fn digamma<const FMA: bool>(z: f32) -> f32 {
    lgamma_digamma::<FMA>(z).1
}

/// Σ v in a fixed order with 16 independent partial sums (vectorizes; the
/// same inputs always give the same bits).
#[inline(always)]
pub fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] += c[k];
        }
    }
    let mut s = 0f32;
    for (k, &r) in chunks.remainder().iter().enumerate() {
        acc[k] += r;
    }
    for a in acc {
        s += a;
    }
    s
}

crate::kernels::simd::wide_copies! {
    /// Σ a·b over the shorter slice, with 16 independent partial sums in a
    /// fixed order (no fused multiply-add: every copy gives the same bits).
    pub fn dot(a: &[f32], b: &[f32]) -> f32 = dot_body
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let (mut ca, mut cb) = (a.chunks_exact(16), b.chunks_exact(16));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    for (k, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[k] += x * y;
    }
    acc.iter().sum()
}

/// Indices known to be below `bound`: checked once, then used by
/// `gather` on any slice of at least `bound` values without a bounds check
/// per element (the non-zeros of a count row, gathered many times).
#[derive(Clone, Copy)]
pub struct Indices<'a> {
    idx: &'a [u32],
    bound: usize,
}

impl<'a> Indices<'a> {
    /// Panics if an index is not below `bound`.
    #[inline(always)]
    pub fn new(idx: &'a [u32], bound: usize) -> Indices<'a> {
        let top = idx.iter().fold(0u32, |m, &j| m.max(j));
        assert!(idx.is_empty() || (top as usize) < bound, "index {top} out of {bound} values");
        Indices { idx, bound }
    }
}

/// out[i] = src[idx[i]] for i < min(number of indices, len out).
#[inline(always)]
pub fn gather(src: &[f32], idx: Indices, out: &mut [f32]) {
    assert!(src.len() >= idx.bound, "gather from {} values, indices up to {}", src.len(), idx.bound);
    let n = idx.idx.len().min(out.len());
    let (ix, out) = (&idx.idx[..n], &mut out[..n]);
    for i in 0..n {
        // SAFETY: i < n = the length of both slices; ix[i] < bound ≤ len src.
        unsafe { *out.get_unchecked_mut(i) = *src.get_unchecked(*ix.get_unchecked(i) as usize) };
    }
}

/// max v (−∞ for an empty slice; NaN if any element is NaN).
#[inline(always)]
pub fn max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut nan = false;
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for k in 0..16 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
            nan |= c[k].is_nan();
        }
    }
    for (k, &r) in chunks.remainder().iter().enumerate() {
        acc[k] = if r > acc[k] { r } else { acc[k] };
        nan |= r.is_nan();
    }
    if nan {
        return f32::NAN;
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &a| if a > m { a } else { m })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f64, hi: f64, n: usize, log: bool) -> Vec<f32> {
        (0..=n)
            .map(|i| {
                let t = i as f64 / n as f64;
                (if log { (lo.ln() + t * (hi.ln() - lo.ln())).exp() } else { lo + t * (hi - lo) }) as f32
            })
            .collect()
    }

    fn rel(a: f32, b: f64) -> f64 {
        (a as f64 - b).abs() / b.abs().max(1e-30)
    }

    #[test]
    fn exp_and_ln_are_within_a_few_ulp() {
        exp_and_ln_are_within_a_few_ulp_with::<false>();
        exp_and_ln_are_within_a_few_ulp_with::<true>();
    }

    fn exp_and_ln_are_within_a_few_ulp_with<const F: bool>() {
        for x in grid(-87.0, 88.0, 100_000, false) {
            let want = (x as f64).exp();
            assert!(rel(exp::<F>(x), want) < 3e-7, "exp({x}) = {} vs {want}", exp::<F>(x));
        }
        for x in grid(1.2e-38, 3e38, 100_000, true) {
            let want = (x as f64).ln();
            assert!(
                (ln::<F>(x) as f64 - want).abs() < 3e-7 * want.abs().max(1.0),
                "ln({x}) = {} vs {want}",
                ln::<F>(x)
            );
        }
        assert_eq!(ln::<F>(0.0), f32::NEG_INFINITY);
        assert!(ln::<F>(-1.0).is_nan() && ln::<F>(f32::NAN).is_nan() && exp::<F>(f32::NAN).is_nan());
        assert_eq!(ln::<F>(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp::<F>(-1000.0), (-87f32).exp());
    }

    #[test]
    fn log1p_softplus_and_sigmoid_hold_at_both_ends() {
        log1p_softplus_and_sigmoid_hold_at_both_ends_with::<false>();
        log1p_softplus_and_sigmoid_hold_at_both_ends_with::<true>();
    }

    fn log1p_softplus_and_sigmoid_hold_at_both_ends_with<const F: bool>() {
        for y in grid(1e-12, 1e6, 20_000, true).into_iter().chain(grid(-0.999, 0.0, 2_000, false)) {
            let want = (y as f64).ln_1p();
            assert!((log1p::<F>(y) as f64 - want).abs() <= 3e-7 * want.abs().max(1e-30), "log1p({y})");
        }
        for t in grid(-80.0, 80.0, 20_001, false) {
            let t64 = t as f64;
            let (sp, sig) = softplus_sigmoid::<F>(t);
            let want_sp = t64.max(0.0) + (-t64.abs()).exp().ln_1p();
            let want_sig = 1.0 / (1.0 + (-t64).exp());
            assert!(rel(sp, want_sp) < 5e-7, "softplus({t}) = {sp} vs {want_sp}");
            assert!(rel(sig, want_sig) < 5e-7, "sigmoid({t}) = {sig} vs {want_sig}");
        }
        assert!(softplus_sigmoid::<F>(f32::NAN).0.is_nan());
    }

    #[test]
    fn lgamma_and_digamma_match_f64_references() {
        lgamma_and_digamma_match_f64_references_with::<false>();
        lgamma_and_digamma_match_f64_references_with::<true>();
    }

    fn lgamma_and_digamma_match_f64_references_with<const F: bool>() {
        use statrs::function::gamma::{digamma as digamma64, ln_gamma};
        for z in grid(1e-6, 1e7, 50_000, true) {
            let z64 = z as f64;
            let (lg, dg) = (ln_gamma(z64), digamma64(z64));
            // Absolute error scaled by the magnitude of the terms that cancel.
            let scale = (z64 * z64.ln()).abs().max(lg.abs()).max(ln_gamma(z64 + 8.0)).max(1.0);
            assert!((lgamma::<F>(z) as f64 - lg).abs() < 1e-6 * scale, "lgamma({z}) = {} vs {lg}", lgamma::<F>(z));
            assert!(
                (digamma::<F>(z) as f64 - dg).abs() < 1e-6 * dg.abs().max(1.0),
                "digamma({z}) = {} vs {dg}",
                digamma::<F>(z)
            );
        }
    }

    #[test]
    fn sums_and_maxima_see_every_element() {
        sums_and_maxima_see_every_element_with::<false>();
        sums_and_maxima_see_every_element_with::<true>();
    }

    fn sums_and_maxima_see_every_element_with<const F: bool>() {
        let v: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let want: f64 = v.iter().map(|&x| x as f64).sum();
        assert!((sum(&v) as f64 - want).abs() < 1e-5);
        assert_eq!(max(&v), v.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let mut w = v.clone();
        w[35] = f32::NAN;
        assert!(max(&w).is_nan());
        assert_eq!(sum(&[]), 0.0);
    }

    /// `dot` sums every product (over the shorter slice); `gather` reads
    /// the indexed values and refuses an index out of range up front.
    #[test]
    fn dots_and_gathers_see_every_element() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..40).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
        assert_eq!(dot(&a, &b).to_bits(), dot(&b[..37], &a).to_bits());
        let idx = [3u32, 0, 36, 3];
        let mut out = [0f32; 4];
        gather(&a, Indices::new(&idx, a.len()), &mut out);
        assert_eq!(out, [a[3], a[0], a[36], a[3]]);
        assert!(std::panic::catch_unwind(|| Indices::new(&[37u32], 37)).is_err());
        assert!(std::panic::catch_unwind(|| gather(&a[..10], Indices::new(&idx, 37), &mut [0f32; 4])).is_err());
    }
}
