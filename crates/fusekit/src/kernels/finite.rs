//! Finding NaN and infinity in inputs: a checkpoint from a diverged run or a bad conversion
//! holds them, and any merge would silently spread them into the output.

use crate::dtype::Dtype;
use multiversion::multiversion;

/// Scanned without branching per element, so the all-finite case vectorizes.
const CHUNK: usize = 64;

/// Whether `values` hold a NaN or infinity: the largest magnitude bit pattern reaches the
/// all-ones exponent. One integer max over the slice, which vectorises (inputs are checked on
/// every block the merge decodes).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
pub(crate) fn any_nonfinite(values: &[f32]) -> bool {
    values
        .iter()
        .fold(0u32, |most, v| most.max(v.to_bits() & 0x7FFF_FFFF))
        >= 0x7F80_0000
}

/// Index of the first NaN or infinity among stored elements of `dtype` (little-endian bytes);
/// integer and bool tensors have none.
pub fn first_nonfinite_stored(dtype: Dtype, bytes: &[u8]) -> Option<usize> {
    fn all_ones<const N: usize>(bytes: &[u8], exponent: u64) -> Option<usize> {
        let mut chunk_start = 0;
        for chunk in bytes.chunks(N * CHUNK) {
            let bits = |e: &[u8]| {
                let mut word = [0u8; 8];
                word[..N].copy_from_slice(e);
                u64::from_le_bytes(word)
            };
            let hit = chunk
                .chunks_exact(N)
                .fold(false, |acc, e| acc | (bits(e) & exponent == exponent));
            if hit {
                let at = chunk
                    .chunks_exact(N)
                    .position(|e| bits(e) & exponent == exponent);
                return at.map(|i| chunk_start + i);
            }
            chunk_start += chunk.len() / N;
        }
        None
    }
    match dtype {
        Dtype::F32 => all_ones::<4>(bytes, 0x7f80_0000),
        Dtype::F16 => all_ones::<2>(bytes, 0x7c00),
        Dtype::BF16 => all_ones::<2>(bytes, 0x7f80),
        Dtype::F64 => all_ones::<8>(bytes, 0x7ff0_0000_0000_0000),
        _ => None,
    }
}

/// How a non-finite value reads in an error message.
pub fn describe(value: f32) -> &'static str {
    if value.is_nan() {
        "NaN"
    } else if value > 0.0 {
        "+inf"
    } else {
        "-inf"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::convert::{decode_finite, encode};

    #[test]
    fn finds_the_first_nonfinite_value_in_every_float_dtype() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 1, 63, 64, 200] {
                let mut values: Vec<f32> = (0..257).map(|i| i as f32 * 0.5 - 60.0).collect();
                values[at] = bad;
                values[250] = bad;
                assert!(any_nonfinite(&values));
                for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
                    let mut bytes = vec![0u8; values.len() * dtype.size()];
                    encode(dtype, &values, &mut bytes);
                    assert_eq!(first_nonfinite_stored(dtype, &bytes), Some(at), "{dtype:?}");
                    let mut decoded = vec![0f32; values.len()];
                    assert!(!decode_finite(dtype, &bytes, &mut decoded), "{dtype:?}");
                }
            }
        }
        let finite: Vec<f32> = vec![f32::MAX, f32::MIN, 0.0, -0.0, 1e-45];
        assert!(!any_nonfinite(&finite));
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let mut bytes = vec![0u8; finite.len() * dtype.size()];
            // Out of f16 and bf16 range they round to infinity: only the small ones there.
            let values = if dtype == Dtype::F32 {
                &finite[..]
            } else {
                &finite[2..]
            };
            encode(dtype, values, &mut bytes[..values.len() * dtype.size()]);
            let mut decoded = vec![0f32; values.len()];
            let bytes = &bytes[..values.len() * dtype.size()];
            assert!(decode_finite(dtype, bytes, &mut decoded), "{dtype:?}");
            assert_eq!(first_nonfinite_stored(dtype, bytes), None);
        }
        assert_eq!(first_nonfinite_stored(Dtype::I32, &[0xff; 8]), None);
        assert_eq!(
            first_nonfinite_stored(Dtype::F64, &f64::NAN.to_le_bytes()),
            Some(0)
        );
    }
}
