//! Branch-free `exp` and `ln` that vectorise across scoring lanes (libm's are a call per
//! element), for the mixture energy: in f64 for the energies reported, in f32 for the energy
//! drops that explain a verdict (whose shares are f32). Each takes one value per lane and
//! loops over the lanes innermost, so every step is one vector operation; a lane's result does
//! not depend on the other lanes.

use std::ops::{Add, AddAssign, Mul, Neg, Sub, SubAssign};

/// Adding 1.5 · 2^52 rounds an f64 to an integer held in its low mantissa bits.
const SHIFTER: f64 = 6_755_399_441_055_744.0;

/// p(x) for coefficients given highest degree first, by Horner with fused multiply-adds.
#[inline(always)]
fn horner<T: LaneFloat, const L: usize, const N: usize>(x: [T; L], coefficients: [T; N]) -> [T; L] {
    let mut p = [coefficients[0]; L];
    // Eight lanes at a time: LLVM splits a longer lane loop into odd pieces (eight, four, two
    // and one lanes), half of them scalar. The f32 loops below run eight at a time too.
    for (p, x) in p.chunks_mut(8).zip(x.chunks(8)) {
        for &c in &coefficients[1..] {
            for (p, &x) in p.iter_mut().zip(x) {
                *p = p.mul_add(x, c);
            }
        }
    }
    p
}

/// 1/(k + 1)! for k = N − 1…0, highest degree first as `horner` takes them:
/// e^r − 1 = r · Σ_k r^k / (k + 1)!. Each factorial up to 12! is exact in f64, so each entry is
/// the correctly rounded reciprocal, as a written-out `1.0 / 479_001_600.0` would be.
const fn expm1_series<const N: usize>() -> [f64; N] {
    let mut series = [0.0; N];
    let mut factorial = 1.0;
    let mut k = 0;
    while k < N {
        factorial *= (k + 1) as f64;
        series[N - 1 - k] = 1.0 / factorial;
        k += 1;
    }
    series
}

/// Twelve terms: f64 precision for |r| ≤ ln 2 / 2.
const EXPM1_SERIES: [f64; 12] = expm1_series();

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

/// [`exp_non_positive`] of eight lanes in one AVX-512 register, step for step: the same fused
/// multiply-adds, subtractions and integer shifts in each lane, so the same bits. Over an
/// array of eight, LLVM split the lanes into pieces of one, two, four and one, each with its
/// own twelve-term series.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn exp_non_positive_avx512(t: [f64; 8]) -> [f64; 8] {
    use std::arch::x86_64::*;
    // SAFETY: eight f64 in `t`.
    let t = unsafe { _mm512_loadu_pd(t.as_ptr()) };
    // `f64::max` keeps −708 where t is NaN, as MAXPD does with the constant second.
    let y = _mm512_max_pd(t, _mm512_set1_pd(-708.0));
    let shifter = _mm512_set1_pd(SHIFTER);
    let shifted = _mm512_fmadd_pd(y, _mm512_set1_pd(std::f64::consts::LOG2_E), shifter);
    let n = _mm512_sub_pd(shifted, shifter);
    // −n·ln 2 + y in one rounding, as (−n).mul_add(ln 2, y).
    let r = _mm512_fnmadd_pd(n, _mm512_set1_pd(std::f64::consts::LN_2), y);
    let mut series = _mm512_set1_pd(EXPM1_SERIES[0]);
    for &c in &EXPM1_SERIES[1..] {
        series = _mm512_fmadd_pd(series, r, _mm512_set1_pd(c));
    }
    let exponent_bits = _mm512_add_epi64(_mm512_castpd_si512(shifted), _mm512_set1_epi64(1023));
    let scale = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(exponent_bits));
    let expm1_r = _mm512_mul_pd(r, series);
    let mut out = [0f64; 8];
    // SAFETY: eight f64 fit `out`.
    unsafe { _mm512_storeu_pd(out.as_mut_ptr(), _mm512_fmadd_pd(scale, expm1_r, scale)) };
    out
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

/// Adding 1.5 · 2^23 rounds an f32 to an integer held in its low mantissa bits.
const SHIFTER_F32: f32 = 12_582_912.0;

/// ln 2 as the nearest f32 and the remainder: with fused multiply-adds, t − n·ln 2 keeps f32
/// precision for every n that occurs (|n| ≤ 126), where the f32 constant alone would be off
/// by up to 2.4e-7.
const LN_2_HI_F32: f32 = std::f32::consts::LN_2;
const LN_2_LO_F32: f32 = -1.904_654_3e-9;

/// Seven terms of [`expm1_series`]: to 3e-9 relative for |r| ≤ ln 2 / 2, below f32's
/// rounding. (Rounding the f64 reciprocals to f32 gives the same bits as dividing in f32.)
const EXPM1_SERIES_F32: [f32; 7] = {
    let wide = expm1_series::<7>();
    let mut narrow = [0f32; 7];
    let mut k = 0;
    while k < 7 {
        narrow[k] = wide[k] as f32;
        k += 1;
    }
    narrow
};

/// e^t for t ≤ 0 in f32 (within a few ulp). Below −87 the result is 0 in effect
/// (e^−87 ≈ 1.6e−38).
#[inline(always)]
pub(crate) fn exp_non_positive_f32<const L: usize>(t: [f32; L]) -> [f32; L] {
    let (mut shifted, mut r) = ([0f32; L], [0f32; L]);
    for ((shifted, r), t) in shifted.chunks_mut(8).zip(r.chunks_mut(8)).zip(t.chunks(8)) {
        for ((shifted, r), &t) in shifted.iter_mut().zip(r.iter_mut()).zip(t) {
            let t = t.max(-87.0);
            *shifted = t.mul_add(std::f32::consts::LOG2_E, SHIFTER_F32);
            let n = *shifted - SHIFTER_F32;
            *r = (-n).mul_add(LN_2_LO_F32, (-n).mul_add(LN_2_HI_F32, t));
        }
    }
    let series = horner(r, EXPM1_SERIES_F32);
    // Plain loops rather than `array::from_fn`, whose closure may be compiled apart from the
    // caller's target features, making each `mul_add` a library call.
    let mut e = [0f32; L];
    for (((e, shifted), r), series) in (e.chunks_mut(8))
        .zip(shifted.chunks(8))
        .zip(r.chunks(8))
        .zip(series.chunks(8))
    {
        for (((e, &shifted), &r), &series) in e.iter_mut().zip(shifted).zip(r).zip(series) {
            // 2^n from n's bits, as in `exp_split`.
            let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
            *e = scale.mul_add(r * series, scale);
        }
    }
    e
}

/// ln s for 1 ≤ s < 2^64 in f32: as [`ln_at_least_one`], with the atanh series to u^9
/// (error below 2e-9).
#[inline(always)]
pub(crate) fn ln_at_least_one_f32<const L: usize>(s: [f32; L]) -> [f32; L] {
    const MANTISSA: u32 = (1 << 23) - 1;
    const TWO_23: f32 = 8_388_608.0;
    let (mut e, mut u, mut u2) = ([0f32; L], [0f32; L], [0f32; L]);
    for (((e, u), u2), s) in (e.chunks_mut(8))
        .zip(u.chunks_mut(8))
        .zip(u2.chunks_mut(8))
        .zip(s.chunks(8))
    {
        for (((e, u), u2), &s) in e.iter_mut().zip(u.iter_mut()).zip(u2.iter_mut()).zip(s) {
            let bits = s.to_bits();
            let exponent = f32::from_bits((bits >> 23) | TWO_23.to_bits()) - TWO_23 - 127.0;
            let m = f32::from_bits((bits & MANTISSA) | 1f32.to_bits());
            let big = m > std::f32::consts::SQRT_2;
            let m = if big { 0.5 * m } else { m };
            *e = if big { exponent + 1.0 } else { exponent };
            *u = (m - 1.0) / (m + 1.0);
            *u2 = *u * *u;
        }
    }
    let series = horner(u2, [1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0]);
    let mut ln = [0f32; L];
    for (((ln, e), u), series) in (ln.chunks_mut(8))
        .zip(e.chunks(8))
        .zip(u.chunks(8))
        .zip(series.chunks(8))
    {
        for (((ln, &e), &u), &series) in ln.iter_mut().zip(e).zip(u).zip(series) {
            *ln = e.mul_add(std::f32::consts::LN_2, 2.0 * u * series);
        }
    }
    ln
}

/// What the lane mixture needs of its float type, so one implementation serves f64 and f32.
pub(crate) trait LaneFloat:
    Copy
    + From<f32>
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
{
    const ZERO: Self;
    const HALF: Self;
    const NEG_INFINITY: Self;
    /// What a non-finite energy becomes.
    const MAX: Self;
    fn from_f64(v: f64) -> Self;
    fn max(self, other: Self) -> Self;
    /// self · a + b, rounded once.
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn is_finite(self) -> bool;
    fn exp_non_positive<const L: usize>(t: [Self; L]) -> [Self; L];
    fn ln_at_least_one<const L: usize>(s: [Self; L]) -> [Self; L];
}

/// The trait's methods are the float type's own, and the lane functions of its precision.
macro_rules! lane_float {
    ($float:ident, $exp:ident, $ln:ident) => {
        impl LaneFloat for $float {
            const ZERO: Self = 0.0;
            const HALF: Self = 0.5;
            const NEG_INFINITY: Self = $float::NEG_INFINITY;
            const MAX: Self = $float::MAX;
            fn from_f64(v: f64) -> Self {
                v as $float
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                $float::max(self, other)
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                $float::mul_add(self, a, b)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                $float::is_finite(self)
            }
            #[inline(always)]
            fn exp_non_positive<const L: usize>(t: [Self; L]) -> [Self; L] {
                $exp(t)
            }
            #[inline(always)]
            fn ln_at_least_one<const L: usize>(s: [Self; L]) -> [Self; L] {
                $ln(s)
            }
        }
    };
}

lane_float!(f64, exp_non_positive, ln_at_least_one);
lane_float!(f32, exp_non_positive_f32, ln_at_least_one_f32);

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

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx512_exp_gives_the_lane_loops_bits() {
        if !crate::scorer::Isa::Avx512.supported() {
            return; // Nothing here runs the AVX-512 copy.
        }
        let mut values: Vec<f64> = (0..=80_000).map(|i| -(i as f64) * 0.009_3).collect();
        values.extend([
            0.0,
            -0.0,
            -708.0,
            -708.5,
            -750.0,
            f64::NEG_INFINITY,
            f64::NAN,
        ]);
        values.extend((1..60).map(|k| -(2f64.powi(-k))));
        for block in values.chunks(8) {
            let mut lanes = [0.0; 8];
            lanes[..block.len()].copy_from_slice(block);
            // SAFETY: this CPU has AVX-512F (checked above).
            let vector = unsafe { exp_non_positive_avx512(lanes) };
            let lane_loop = exp_non_positive(lanes);
            assert_eq!(
                vector.map(f64::to_bits),
                lane_loop.map(f64::to_bits),
                "{lanes:?}"
            );
        }
    }

    /// Distance from libm's f64 result in units of the f32 spacing at that value.
    fn f32_ulps(got: f32, want: f64) -> f64 {
        let spacing =
            f64::from((want as f32).abs().max(f32::MIN_POSITIVE)) * f64::from(f32::EPSILON);
        (f64::from(got) - want).abs() / spacing
    }

    #[test]
    fn lane_exp_and_ln_in_f32_are_within_a_few_ulp_of_libm() {
        let mut t = -87.0f32;
        while t <= 0.0 {
            let got = exp_non_positive_f32([t])[0];
            let ulps = f32_ulps(got, f64::from(t).exp());
            assert!(ulps <= 2.0, "exp({t}) = {got}, {ulps} ulp off");
            t += 0.003_7;
        }
        assert_eq!(exp_non_positive_f32([0.0])[0], 1.0);
        assert!(
            exp_non_positive_f32([-120.0, f32::NEG_INFINITY])
                .iter()
                .all(|&e| e < 1e-37)
        );
        let mut s = 1.0f32;
        while s < 70.0 {
            let got = ln_at_least_one_f32([s])[0];
            let want = f64::from(s).ln();
            // Near s = 1, ln is near 0: judged against f32's spacing at 1 there.
            let ulps =
                f32_ulps(got, want).min((f64::from(got) - want).abs() / f64::from(f32::EPSILON));
            assert!(ulps <= 2.0, "ln({s}) = {got}, libm {want}, {ulps} ulp off");
            s += 0.000_731;
        }
        assert_eq!(ln_at_least_one_f32([1.0])[0], 0.0);
    }
}
