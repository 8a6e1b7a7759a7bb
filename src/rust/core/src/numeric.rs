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

#[cfg(test)]
mod tests {
    #[test]
    fn medians() {
        assert_eq!(super::nan_median(&[3.0, f64::NAN, 1.0, 2.0]), 2.0);
        assert_eq!(super::nan_median(&[4.0, 1.0]), 2.5);
        assert!(super::nan_median(&[f64::NAN]).is_nan());
    }
}
