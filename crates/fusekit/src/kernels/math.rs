//! Elementary functions in plain f32 arithmetic, for loops that call them per element (PCB's
//! balancing scores take an `exp` and a `tanh` per element and model). libm's scalar calls
//! keep such a loop from vectorising; these are branch-free, so the loops around them do.
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
