//! Branch-free `exp`, `erf` and the GELU pieces, written so that a loop over them vectorises.
//!
//! burn-flex computes GELU element by element through libm's scalar `erff` (a few ulp, but one
//! lane at a time): 21% of a clip-tiny CPU step, forward and backward. These versions use only
//! `+ - * /`, `abs`, `min`/`max`, selects and bit moves, so LLVM turns the loops below into 8-lane
//! (AVX2) or 16-lane (AVX-512) code. There is no FMA contraction (Rust never contracts `a * b +
//! c`), so every machine, whatever its vector width, computes the same bits.
//!
//! Accuracy, checked against f64 in the tests: `exp` within 3 ulp; `erf` within 2.5e-7 absolute
//! (its Maclaurin series below |x| = 1, also within 2e-7 relative there; Abramowitz & Stegun
//! 7.1.26 above, the formula PyTorch's vectorised CPU `erf` uses).

use std::f32::consts::{FRAC_1_SQRT_2, LN_2, LOG2_E};

/// e^x for x in [-87, 88]; 0 below (where e^x is subnormal, so that a -inf mask weighs
/// exactly nothing), e^88 above.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let y = exp_normal(x);
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// e^x with x clamped to [-87, 88].
#[inline(always)]
fn exp_normal(x: f32) -> f32 {
    // Round-to-nearest by the 1.5 x 2^23 shift, which needs no rounding instruction.
    const SHIFT: f32 = 12_582_912.0;
    // ln 2 split so that n * LN2_HI is exact for |n| < 2^11 (Cody & Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = LN_2 - LN2_HI;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + SHIFT;
    let n = shifted - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO; // |r| <= ln2 / 2
                                           // Taylor series of e^r to r^7: the next term is below 5e-9 relative on |r| <= 0.347.
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // 2^n from n's bits, which sit at the bottom of `shifted`'s mantissa (no float -> int
    // conversion: Rust's saturating one keeps LLVM from vectorising the loop).
    let n_bits = shifted.to_bits().wrapping_sub(SHIFT.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// erf(x), given also e^(-x^2) (GELU's backward needs that exponential too, so it is shared).
#[inline(always)]
fn erf_with(x: f32, exp_neg_x2: f32) -> f32 {
    let a = x.abs();
    // Maclaurin: 2/sqrt(pi) sum (-1)^n x^(2n+1) / (n! (2n+1)), 12 terms: 1.5e-7 at |x| = 1.
    const C: f32 = std::f32::consts::FRAC_2_SQRT_PI;
    const DENOMS: [f32; 11] = [
        76_204_800.0,
        6_894_720.0,
        685_440.0,
        75_600.0,
        9_360.0,
        1_320.0,
        216.0,
        42.0,
        10.0,
        3.0,
        1.0,
    ];
    let z = a * a;
    let mut s = -C / 918_086_400.0;
    for (i, d) in DENOMS.into_iter().enumerate() {
        let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
        s = s * z + sign * C / d;
    }
    let small = a * s;
    // Abramowitz & Stegun 7.1.26: 1 - (a1 t + ... + a5 t^5) e^(-x^2), t = 1 / (1 + p x).
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut q = 1.061_405_4;
    for c in [-1.453_152_1, 1.421_413_7, -0.284_496_74, 0.254_829_6] {
        q = q * t + c;
    }
    let large = 1.0 - q * t * exp_neg_x2;
    let y = if a < 1.0 { small } else { large };
    y.copysign(x)
}

/// erf(x).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with(x, exp(-x * x))
}

/// Exact GELU, `x * Phi(x)` with Phi the standard normal CDF.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// d gelu / dx = Phi(x) + x * phi(x), phi the standard normal density.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let u = x * FRAC_1_SQRT_2;
    let e = exp(-u * u); // e^(-x^2/2): phi(x) * sqrt(2 pi), and erf's exponential
    0.5 * (1.0 + erf_with(u, e)) + x * INV_SQRT_2PI * e
}

/// `sum over i of f([a[i], b[i], ...])` for equal-length slices, in 8 fixed lanes (element i
/// into lane i mod 8), then the lanes in order: vectorisable, and the same on every CPU.
#[inline(always)]
pub fn lane_sum<const N: usize>(arrays: [&[f32]; N], f: impl Fn([f32; N]) -> f32) -> f32 {
    let n = arrays[0].len();
    assert!(arrays.iter().all(|a| a.len() == n));
    let mut lanes = [0f32; 8];
    let full = n - n % 8;
    for base in (0..full).step_by(8) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f(arrays.map(|a| a[base + l]));
        }
    }
    for (lane, i) in lanes.iter_mut().zip(full..n) {
        *lane += f(arrays.map(|a| a[i]));
    }
    lanes.iter().sum()
}

/// `out[i] = f(x[i])`, compiled for the widest vector unit this CPU has, chosen at run time by
/// `pulp` (AVX2 on x86-64 where present, scalar code elsewhere).
pub fn map(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    debug_assert_eq!(x.len(), out.len());
    pulp::Arch::new().dispatch(Map {
        x,
        out,
        f,
        scale: false,
    })
}

/// `g[i] *= f(x[i])` in place, dispatched like [`map`].
pub fn scale_by(x: &[f32], g: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    debug_assert_eq!(x.len(), g.len());
    pulp::Arch::new().dispatch(Map {
        x,
        out: g,
        f,
        scale: true,
    })
}

/// The loop body of [`map`] and [`scale_by`]; `with_simd` is inlined into a function compiled
/// with the CPU's target features, so the loop vectorises with them.
struct Map<'a, F> {
    x: &'a [f32],
    out: &'a mut [f32],
    f: F,
    scale: bool,
}

impl<F: Fn(f32) -> f32> pulp::WithSimd for Map<'_, F> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Map { x, out, f, scale } = self;
        if scale {
            for (o, &v) in out.iter_mut().zip(x) {
                *o *= f(v);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = f(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> impl Iterator<Item = f32> {
        (-12_000..=12_000).map(|i| i as f32 * 1e-3)
    }

    fn erf64(x: f64) -> f64 {
        // erf by its Maclaurin series in f64, summed until the terms vanish (|x| <= 3 here);
        // beyond that erf is 1 to within f32 resolution.
        if x.abs() > 3.0 {
            return x.signum() * (1.0 - erfc_tail(x.abs()));
        }
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-18 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn erfc_tail(x: f64) -> f64 {
        // Asymptotic series, accurate to 1e-9 for x > 3.
        let mut s = 1.0;
        let mut term = 1.0;
        for n in 1..6 {
            term *= -((2 * n - 1) as f64) / (2.0 * x * x);
            s += term;
        }
        (-x * x).exp() / (x * std::f64::consts::PI.sqrt()) * s
    }

    #[test]
    fn exp_is_zero_below_the_normal_range() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(1e4), exp(88.0));
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn exp_is_within_three_ulp_of_f64() {
        for x in (-86_999..=87_999).map(|i| i as f32 * 1e-3) {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(
                ((got - want) / want).abs() < 3.6e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn erf_matches_f64_to_2_5e_7() {
        for x in grid() {
            let want = erf64(x as f64);
            let got = erf(x) as f64;
            assert!((got - want).abs() < 2.5e-7, "erf({x}) = {got}, want {want}");
            if x.abs() < 1.0 && x != 0.0 {
                assert!(((got - want) / want).abs() < 2e-7, "erf({x}) relative");
            }
        }
        assert_eq!(erf(0.0), 0.0);
    }

    #[test]
    fn gelu_and_its_gradient_match_f64() {
        for x in grid() {
            let xd = x as f64;
            let cdf = 0.5 * (1.0 + erf64(xd / 2f64.sqrt()));
            let pdf = (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (want, want_grad) = (xd * cdf, cdf + xd * pdf);
            let tol = 2e-7 * xd.abs().max(1.0);
            assert!((gelu(x) as f64 - want).abs() < tol, "gelu({x})");
            assert!((gelu_grad(x) as f64 - want_grad).abs() < 4e-7, "gelu'({x})");
        }
    }

    #[test]
    fn the_dispatched_loops_compute_the_same_bits_as_scalar_code() {
        let x: Vec<f32> = grid().collect();
        let mut fast = vec![0.0; x.len()];
        map(&x, &mut fast, gelu);
        assert!(x
            .iter()
            .zip(&fast)
            .all(|(&v, y)| gelu(v).to_bits() == y.to_bits()));
        let mut g = vec![1.5; x.len()];
        scale_by(&x, &mut g, gelu_grad);
        assert!(x
            .iter()
            .zip(&g)
            .all(|(&v, y)| (1.5 * gelu_grad(v)).to_bits() == y.to_bits()));
    }

    #[test]
    fn lane_sum_adds_every_element_once() {
        for n in [0, 1, 7, 8, 9, 64, 65, 130] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 0.01).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
            let got = lane_sum([&a, &b], |[x, y]| x * y) as f64;
            assert!((got - want).abs() < 1e-5, "n = {n}: {got} vs {want}");
        }
    }
}
