//! Branch-free `exp` and `ln` that vectorise across scoring lanes (libm's are a call per
//! element), for the mixture energy. Each takes one value per lane and loops over the lanes
//! innermost, so every step is one vector operation; a lane's result does not depend on the
//! other lanes.

/// Adding 1.5 · 2^52 rounds an f64 to an integer held in its low mantissa bits.
const SHIFTER: f64 = 6_755_399_441_055_744.0;

/// p(x) for coefficients given highest degree first, by Horner with fused multiply-adds.
#[inline(always)]
fn horner<const L: usize, const N: usize>(x: [f64; L], coefficients: [f64; N]) -> [f64; L] {
    let mut p = [coefficients[0]; L];
    // Eight lanes at a time: LLVM splits a longer lane loop into odd pieces (eight, four, two
    // and one lanes), half of them scalar.
    for (p, x) in p.chunks_mut(8).zip(x.chunks(8)) {
        for &c in &coefficients[1..] {
            for (p, &x) in p.iter_mut().zip(x) {
                *p = p.mul_add(x, c);
            }
        }
    }
    p
}

/// 1/(k + 1)! for k = 11…0, highest degree first as `horner` takes them:
/// e^r − 1 = r · Σ_k r^k / (k + 1)!.
const EXPM1_SERIES: [f64; 12] = [
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    1.0 / 2.0,
    1.0,
];

/// e^y split as (2^n, e^r − 1) with y = n ln 2 + r and |r| ≤ ln 2 / 2, for |y| ≤ 708. Twelve
/// terms of the series for e^r − 1 give a relative error near 1e-15.
#[inline(always)]
pub(crate) fn exp_split<const L: usize>(y: [f64; L]) -> ([f64; L], [f64; L]) {
    let (mut shifted, mut r) = ([0f64; L], [0f64; L]);
    for lane in 0..L {
        shifted[lane] = y[lane].mul_add(std::f64::consts::LOG2_E, SHIFTER);
        let n = shifted[lane] - SHIFTER;
        r[lane] = (-n).mul_add(std::f64::consts::LN_2, y[lane]);
    }
    let series = horner(r, EXPM1_SERIES);
    let (mut scale, mut expm1_r) = ([0f64; L], [0f64; L]);
    for lane in 0..L {
        // 2^n from n's bits: integer shifts vectorise, packed f64-to-integer conversion does
        // not without AVX-512.
        scale[lane] = f64::from_bits(shifted[lane].to_bits().wrapping_add(1023) << 52);
        expm1_r[lane] = r[lane] * series[lane];
    }
    (scale, expm1_r)
}

/// e^t for t ≤ 0 (relative error about 1e-14). Below −708 the result is 0 in effect
/// (e^−708 ≈ 3e−308).
#[inline(always)]
pub(crate) fn exp_non_positive<const L: usize>(t: [f64; L]) -> [f64; L] {
    let (scale, expm1_r) = exp_split(t.map(|t| t.max(-708.0)));
    std::array::from_fn(|lane| scale[lane].mul_add(expm1_r[lane], scale[lane]))
}

/// ln s for 1 ≤ s < 2^64: s = m · 2^e with m in [√½, √2), ln m = 2 atanh(u) with
/// u = (m − 1)/(m + 1), |u| ≤ 0.172, by its odd series to u^17 (error below 1e-15).
#[inline(always)]
pub(crate) fn ln_at_least_one<const L: usize>(s: [f64; L]) -> [f64; L] {
    const MANTISSA: u64 = (1 << 52) - 1;
    const TWO_52: f64 = 4_503_599_627_370_496.0;
    let (mut e, mut u, mut u2) = ([0f64; L], [0f64; L], [0f64; L]);
    for lane in 0..L {
        let bits = s[lane].to_bits();
        // The exponent as an f64 without a packed integer conversion: place it in 2^52's
        // mantissa.
        let exponent = f64::from_bits((bits >> 52) | TWO_52.to_bits()) - TWO_52 - 1023.0;
        let m = f64::from_bits((bits & MANTISSA) | 1f64.to_bits());
        let big = m > std::f64::consts::SQRT_2;
        let m = if big { 0.5 * m } else { m };
        e[lane] = if big { exponent + 1.0 } else { exponent };
        u[lane] = (m - 1.0) / (m + 1.0);
        u2[lane] = u[lane] * u[lane];
    }
    let series = horner(
        u2,
        [
            1.0 / 17.0,
            1.0 / 15.0,
            1.0 / 13.0,
            1.0 / 11.0,
            1.0 / 9.0,
            1.0 / 7.0,
            1.0 / 5.0,
            1.0 / 3.0,
            1.0,
        ],
    );
    std::array::from_fn(|lane| {
        e[lane].mul_add(std::f64::consts::LN_2, 2.0 * u[lane] * series[lane])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_exp_and_ln_match_libm() {
        let mut t = -708.0;
        while t <= 0.0 {
            let (got, want) = (exp_non_positive([t])[0], t.exp());
            assert!(
                (got - want).abs() <= 1e-13 * want + f64::MIN_POSITIVE,
                "exp({t}) = {got}, libm {want}"
            );
            t += 0.0137;
        }
        assert_eq!(exp_non_positive([0.0])[0], 1.0);
        assert!(
            exp_non_positive([-750.0, f64::NEG_INFINITY])
                .iter()
                .all(|&e| e < 1e-300)
        );
        let mut y = -20.0;
        while y <= 20.0 {
            let ([scale], [expm1_r]) = exp_split([y]);
            let want = y.exp_m1();
            let got = scale.mul_add(expm1_r, scale - 1.0);
            assert!(
                (got - want).abs() <= 1e-14 * want.abs(),
                "expm1({y}) = {got}, libm {want}"
            );
            y += 0.000_913;
        }
        let mut s = 1.0;
        while s < 70.0 {
            let (got, want) = (ln_at_least_one([s])[0], s.ln());
            assert!(
                (got - want).abs() <= 1e-14 * want.max(1.0),
                "ln({s}) = {got}, libm {want}"
            );
            s += 0.000_731;
        }
        assert_eq!(ln_at_least_one([1.0])[0], 0.0);
    }
}
