//! Elementary functions in plain IEEE arithmetic, for loops that call them per element (PCB's
//! balancing scores take an `exp` and a `tanh` per element and model, Arcee Fusion's row KL
//! divergences two `exp` and a `ln` in f64). libm's scalar calls keep such a loop from
//! vectorising; these are branch-free, so the loops around them do.
//!
//! Only IEEE additions, multiplications, divisions and bit casts are used, never a fused
//! multiply-add, so the result is the same bits whether a loop runs scalar, on AVX2 or on
//! AVX-512: the reproducibility promise holds across machines. Accuracy (tested against libm):
//! a few ulp.

/// ln 2 split so that `n·LN2_HI` is exact for the |n| ≤ 128 used here (Cody–Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding and subtracting 1.5·2²³ rounds an f32 of magnitude < 2²² to the nearest integer
/// (ties to even) in two exact IEEE operations.
const ROUND: f32 = 12_582_912.0;

/// eˣ, for x in [-87.3, 88.3] (clamped outside: 0 is approached as 2⁻¹²⁶, not reached).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Cephes' minimax polynomial for eʳ on [-ln2/2, ln2/2].
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// tanh(x) for every finite x.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    // Small |x|: Cephes' odd polynomial keeps the relative accuracy that 1 − 2/(e²ˣ + 1)
    // would lose to cancellation.
    let z = x * x;
    let mut p = -5.704_988_7e-3_f32;
    p = p * z + 2.063_909e-2;
    p = p * z - 5.373_971_6e-2;
    p = p * z + 1.333_144_2e-1;
    p = p * z - 3.333_328e-1;
    let small = p * z * x + x;
    let large = (1.0 - 2.0 / (exp(2.0 * a) + 1.0)).copysign(x);
    if a < 0.625 {
        small
    } else {
        large
    }
}

/// ln 2 split for f64 (fdlibm's): `n·LN2_HI_F64` is exact for |n| < 2¹¹.
const LN2_HI_F64: f64 = 6.931_471_803_691_238e-1;
const LN2_LO_F64: f64 = 1.908_214_929_270_587_7e-10;
/// 1.5·2⁵²: adding and subtracting it rounds an f64 of magnitude < 2⁵¹ to an integer.
const ROUND_F64: f64 = 6_755_399_441_055_744.0;

/// eˣ in f64, for x in [-708, 709] (clamped outside: 0 is approached as 2⁻¹⁰²², not reached).
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    let x = x.clamp(-708.0, 709.0);
    let n = (x * std::f64::consts::LOG2_E + ROUND_F64) - ROUND_F64;
    let r = (x - n * LN2_HI_F64) - n * LN2_LO_F64;
    // Taylor to r¹³ on |r| ≤ ln2/2: the remainder is below 10⁻¹⁷.
    let mut p = 1.0 / 6_227_020_800.0;
    for k in (2..=12).rev() {
        p = p * r + 1.0 / FACTORIALS[k];
    }
    let er = (p * r * r + r) + 1.0;
    er * f64::from_bits(((n as i64 + 1023) as u64) << 52)
}

/// k! for k ≤ 12, exact in f64.
const FACTORIALS: [f64; 13] = [
    1.0,
    1.0,
    2.0,
    6.0,
    24.0,
    120.0,
    720.0,
    5_040.0,
    40_320.0,
    362_880.0,
    3_628_800.0,
    39_916_800.0,
    479_001_600.0,
];

/// ln x in f64, for positive normal x (ratios of probabilities, never 0 or subnormal here).
#[inline(always)]
pub fn ln_f64(x: f64) -> f64 {
    // x = m·2ᵉ with m in [√½, √2), so that s = (m − 1)/(m + 1) stays within ±0.172.
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7FF) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | (1023 << 52));
    let high = m > std::f64::consts::SQRT_2;
    m = if high { m * 0.5 } else { m };
    e += high as i64;
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    // ln m = 2·atanh s = 2(s + s³/3 + s⁵/5 + …), to s²³: the remainder is below 10⁻¹⁸.
    let mut p = 1.0 / 23.0;
    for k in (0..11).rev() {
        p = p * z + 1.0 / (2 * k + 1) as f64;
    }
    let ln_m = 2.0 * s * p;
    let e = e as f64;
    e * LN2_HI_F64 + (ln_m + e * LN2_LO_F64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    fn grid(lo: f32, hi: f32, steps: usize) -> impl Iterator<Item = f32> {
        (0..=steps).map(move |i| lo + (hi - lo) * i as f32 / steps as f32)
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        for x in grid(-87.0, 88.0, 200_000).chain([0.0, -0.0, 1e-8, -1e-8, 1.0]) {
            let (got, want) = (exp(x), x.exp());
            assert!(ulps(got, want) <= 2, "exp({x}) = {got}, libm {want}");
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    fn ulps_f64(a: f64, b: f64) -> u64 {
        (a.to_bits() as i128 - b.to_bits() as i128).unsigned_abs() as u64
    }

    #[test]
    fn exp_f64_is_within_a_few_ulp_of_libm() {
        let steps = 400_000;
        let grid = (0..=steps).map(|i| -708.0 + 1417.0 * i as f64 / steps as f64);
        for x in grid.chain([0.0, -0.0, 1e-12, -1e-12, 1.0, -0.5, 0.3465]) {
            let (got, want) = (exp_f64(x), x.exp());
            assert!(ulps_f64(got, want) <= 2, "exp({x}) = {got}, libm {want}");
        }
        assert_eq!(exp_f64(0.0), 1.0);
        assert!(exp_f64(-1e4) > 0.0 && exp_f64(-1e4) < 1e-307);
    }

    #[test]
    fn ln_f64_is_within_a_few_ulp_of_libm() {
        let steps = 400_000;
        // Ratios from 10⁻¹² to 10¹², and the neighbourhood of 1 where ln is small.
        let wide = (0..=steps).map(|i| 10f64.powf(-12.0 + 24.0 * i as f64 / steps as f64));
        let near_one = (0..=steps).map(|i| 0.9 + 0.2 * i as f64 / steps as f64);
        for x in wide
            .chain(near_one)
            .chain([1.0, 2.0, 0.5, std::f64::consts::SQRT_2])
        {
            let (got, want) = (ln_f64(x), x.ln());
            let close = ulps_f64(got, want) <= 4;
            assert!(close, "ln({x}) = {got}, libm {want}");
        }
        assert_eq!(ln_f64(1.0), 0.0);
    }

    #[test]
    fn tanh_is_within_a_few_ulp_of_libm_and_odd() {
        let tiny = [1e-30, 1e-12, 1e-6, 3e-4, 0.1, 0.6249, 0.625, 0.6251];
        for x in grid(-12.0, 12.0, 200_000).chain(tiny) {
            let (got, want) = (tanh(x), x.tanh());
            assert!(ulps(got, want) <= 3, "tanh({x}) = {got}, libm {want}");
            assert_eq!(tanh(-x), -got);
        }
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(tanh(-1e30), -1.0);
        assert_eq!(tanh(0.0), 0.0);
    }
}
