//! Stored bytes ↔ f32. bf16 is handled on its bit pattern (a shift one way, round-to-nearest-even
//! the other) because `half`'s slice conversion was measured 5.6× slower for bf16
//! (shared/specs/engineering.md). Loops are written to auto-vectorise and compiled for AVX-512
//! and AVX2 with runtime dispatch.

use crate::dtype::Dtype;
use multiversion::multiversion;

/// Decodes `out.len()` little-endian elements of `dtype` from `bytes` into f32.
/// Only mergeable float dtypes are accepted; the planner guarantees it.
pub fn decode(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::BF16 => {
            bf16_to_f32(bytes, out);
        }
        Dtype::F16 => f16_to_f32(bytes, out),
        Dtype::F32 => f32_from_le(bytes, out),
        other => unreachable!("decode called on {other}"),
    }
}

/// Decodes like [`decode`] and tells whether every value is finite, checked in the same read
/// for bf16 (one integer max over the bits as they are widened) instead of a second pass.
pub fn decode_finite(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> bool {
    match dtype {
        Dtype::BF16 => bf16_to_f32(bytes, out),
        _ => {
            decode(dtype, bytes, out);
            !super::finite::any_nonfinite(out)
        }
    }
}

/// Encodes f32 values into `out` as `dtype`, rounding to nearest even.
pub fn encode(dtype: Dtype, values: &[f32], out: &mut [u8]) {
    match dtype {
        Dtype::BF16 => f32_to_bf16(values, out),
        Dtype::F16 => f32_to_f16(values, out),
        Dtype::F32 => f32_to_le(values, out),
        other => unreachable!("encode called on {other}"),
    }
}

/// Rounds an f32 to the nearest bf16 (and back to f32).
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// Rounds an f32 to the nearest representable value of `dtype` (and back to f32).
#[inline]
pub fn round_to(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::BF16 => round_bf16(x),
        Dtype::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Rounds every value to `dtype` in place (see `round_to`).
pub fn round_slice(dtype: Dtype, values: &mut [f32]) {
    match dtype {
        Dtype::BF16 => round_slice_bf16(values),
        _ => values.iter_mut().for_each(|x| *x = round_to(dtype, *x)),
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn round_slice_bf16(values: &mut [f32]) {
    for x in values {
        *x = round_bf16(*x);
    }
}

#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) as u16) | 0x0040;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// Widens bf16 to f32 and tells whether every value is finite (the integer max rides along in
/// registers, so `decode` uses it too and ignores the answer).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn bf16_to_f32(bytes: &[u8], out: &mut [f32]) -> bool {
    let mut most = 0u16;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let bits = u16::from_le_bytes([b[0], b[1]]);
        most = most.max(bits & 0x7FFF);
        *o = f32::from_bits((bits as u32) << 16);
    }
    most < 0x7F80
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn f32_to_bf16(values: &[f32], out: &mut [u8]) {
    for (o, &x) in out.chunks_exact_mut(2).zip(values) {
        o.copy_from_slice(&bf16_bits(x).to_le_bytes());
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+f16c", "x86_64+avx2+fma+f16c"))]
fn f16_to_f32(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+f16c", "x86_64+avx2+fma+f16c"))]
fn f32_to_f16(values: &[f32], out: &mut [u8]) {
    for (o, &x) in out.chunks_exact_mut(2).zip(values) {
        o.copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn f32_from_le(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn f32_to_le(values: &[f32], out: &mut [u8]) {
    for (o, &x) in out.chunks_exact_mut(4).zip(values) {
        o.copy_from_slice(&x.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn samples() -> Vec<f32> {
        let mut v: Vec<f32> = (0..20000)
            .map(|i| ((i as f32) * 0.7131).sin() * 10f32.powi(i % 13 - 6))
            .collect();
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            65520.0,
        ]);
        v
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let values = samples();
        let mut bytes = vec![0u8; values.len() * 2];
        encode(Dtype::BF16, &values, &mut bytes);
        for (x, b) in values.iter().zip(bytes.chunks_exact(2)) {
            assert_eq!(
                u16::from_le_bytes([b[0], b[1]]),
                bf16::from_f32(*x).to_bits(),
                "{x}"
            );
        }
        let mut back = vec![0f32; values.len()];
        decode(Dtype::BF16, &bytes, &mut back);
        for (x, y) in values.iter().zip(&back) {
            assert_eq!(bf16::from_f32(*x).to_f32().to_bits(), y.to_bits());
            assert_eq!(round_to(Dtype::BF16, *x).to_bits(), y.to_bits());
        }
        let mut nan = [0u8; 2];
        encode(Dtype::BF16, &[f32::NAN], &mut nan);
        assert!(bf16::from_bits(u16::from_le_bytes(nan)).is_nan());
    }

    #[test]
    fn f16_and_f32_round_trip() {
        let values = samples();
        let mut bytes = vec![0u8; values.len() * 2];
        encode(Dtype::F16, &values, &mut bytes);
        let mut back = vec![0f32; values.len()];
        decode(Dtype::F16, &bytes, &mut back);
        for (x, y) in values.iter().zip(&back) {
            assert_eq!(f16::from_f32(*x).to_f32().to_bits(), y.to_bits(), "{x}");
        }
        let mut bytes = vec![0u8; values.len() * 4];
        encode(Dtype::F32, &values, &mut bytes);
        decode(Dtype::F32, &bytes, &mut back);
        assert_eq!(
            values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}
