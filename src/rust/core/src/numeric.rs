//! Small numeric helpers shared by the modules.

/// Median of the non-NaN values; NaN when there are none.
pub fn nan_median(v: &[f64]) -> f64 {
    let mut f: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if f.is_empty() {
        return f64::NAN;
    }
    f.sort_by(f64::total_cmp);
    let m = f.len() / 2;
    if f.len() % 2 == 1 {
        f[m]
    } else {
        (f[m - 1] + f[m]) / 2.0
    }
}

/// e^x for x ≤ 0 (larger x are treated as 0), relative error below 1e-14;
/// results under e^−708 are e^−708. Branch-free so that loops over slices
/// vectorize: the libm call was the largest cost of Harmony's soft k-means.
#[inline]
pub fn exp_nonpositive(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238_2e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52: adding it rounds to an integer
    let x = x.clamp(-708.0, 0.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, read from t's low mantissa bits (integer ops vectorize
    // where an f64 → i64 conversion does not).
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - n * LN2_HI - n * LN2_LO; // |r| ≤ ln2 / 2
    // Taylor series of e^r to degree 12 (remainder < 1e-16 on |r| ≤ 0.347).
    const C: [f64; 13] = [
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let mut p = C[0];
    for &c in &C[1..] {
        p = p * r + c;
    }
    p * f64::from_bits(ni.wrapping_add(1023) << 52)
}

/// ln(x) for positive normal x, absolute error below 1e-12 (subnormals and
/// other values fall back to the library).
#[inline]
pub fn ln_positive(x: f64) -> f64 {
    if !(f64::MIN_POSITIVE..f64::MAX).contains(&x) {
        return x.ln();
    }
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000); // [1, 2)
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s), s = (m − 1) / (m + 1), |s| ≤ 0.172.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    const C: [f64; 9] = [1.0 / 17.0, 1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0];
    let mut p = C[0];
    for &c in &C[1..] {
        p = p * s2 + c;
    }
    2.0 * s * p + e as f64 * std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    #[test]
    fn medians() {
        assert_eq!(super::nan_median(&[3.0, f64::NAN, 1.0, 2.0]), 2.0);
        assert_eq!(super::nan_median(&[4.0, 1.0]), 2.5);
        assert!(super::nan_median(&[f64::NAN]).is_nan());
    }

    #[test]
    fn fast_exp_and_log_match_the_library() {
        for i in 0..=200_000 {
            let x = -750.0 * i as f64 / 200_000.0;
            let (ours, lib) = (super::exp_nonpositive(x), x.max(-708.0).exp());
            assert!((ours - lib).abs() <= 1e-14 * lib, "exp({x}): {ours} vs {lib}");
            let y = 10f64.powf(-300.0 + 600.0 * i as f64 / 200_000.0);
            let (ours, lib) = (super::ln_positive(y), y.ln());
            assert!((ours - lib).abs() <= 1e-12 * lib.abs().max(1.0), "ln({y}): {ours} vs {lib}");
        }
        assert_eq!(super::exp_nonpositive(0.0), 1.0);
        assert_eq!(super::exp_nonpositive(3.0), 1.0);
        assert_eq!(super::ln_positive(1.0), 0.0);
    }
}
