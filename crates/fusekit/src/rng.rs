//! A counter-based random stream: the value for element `i` of tensor `t` of model `m` is a pure
//! function of `(seed, t, m, i)`. Masks therefore do not depend on thread count, chunking,
//! scheduling or which machine of a distributed run computes the tensor.

/// The key of one (seed, tensor, model) stream.
pub fn stream_key(seed: u64, tensor: &str, model: usize) -> u64 {
    // FNV-1a: stable across platforms and releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tensor.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(mix(seed ^ h).wrapping_add(model as u64))
}

/// SplitMix64's finaliser: a bijective mixer with full avalanche.
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) for element `index` of the stream `key`: `uniform_bits` as a
/// fraction of 2⁵³.
#[inline(always)]
pub fn uniform(key: u64, index: u64) -> f64 {
    uniform_bits(key, index) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The 53-bit integer behind `uniform(key, index)`.
#[inline(always)]
pub fn uniform_bits(key: u64, index: u64) -> u64 {
    mix(key.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15))) >> 11
}

/// Fast 32-bit draws of a stream, for hot loops (DARE masks): one round of a full-avalanche 32-bit
/// integer hash of the index, keyed by the stream before and after; it vectorises on AVX2. A view is valid for indices sharing their high
/// 32 bits; executor blocks never straddle such a boundary.
#[derive(Debug, Clone, Copy)]
pub struct Draws {
    a: u32,
    b: u32,
}

impl Draws {
    pub fn at(key: u64, index: u64) -> Draws {
        let k = mix(key ^ (index >> 32).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        Draws {
            a: k as u32,
            b: (k >> 32) as u32,
        }
    }

    #[inline(always)]
    pub fn bits(self, index: u64) -> u32 {
        hash32(index as u32 ^ self.a) ^ self.b
    }

    /// `bits` of sixteen indices at once, given by their low 32 bits (all sharing the high
    /// 32 bits this view was made for).
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub fn bits16(self, index: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let splat = |v: u32| _mm512_set1_epi32(v as i32);
        let shift_xor = |x: __m512i, by: u32| _mm512_xor_si512(x, _mm512_srlv_epi32(x, splat(by)));
        let mut x = _mm512_xor_si512(index, splat(self.a));
        x = shift_xor(x, 16);
        x = _mm512_mullo_epi32(x, splat(HASH32_MULTIPLIERS[0]));
        x = shift_xor(x, 15);
        x = _mm512_mullo_epi32(x, splat(HASH32_MULTIPLIERS[1]));
        x = shift_xor(x, 16);
        _mm512_xor_si512(x, splat(self.b))
    }

    /// A view with the given parts, to aim draws at chosen values in tests.
    #[cfg(test)]
    pub fn from_parts(a: u32, b: u32) -> Draws {
        Draws { a, b }
    }

    /// The 32-bit draw that `bits` gives at `index` is `target` for the view
    /// `from_parts(a, aimed_at(a, index, target))`.
    #[cfg(test)]
    pub fn aimed_at(a: u32, index: u64, target: u32) -> u32 {
        hash32(index as u32 ^ a) ^ target
    }
}

/// The 32-bit threshold under which a draw means "keep" with probability `p` (< 1).
/// Fisher–Yates over `0..n` on the stream keyed by (seed, `stream`): the same order for the same
/// seed on any machine.
pub fn permutation(seed: u64, stream: &str, n: usize) -> Vec<usize> {
    let key = stream_key(seed, stream, 0);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (uniform(key, i as u64) * (i + 1) as f64) as usize;
        order.swap(i, j.min(i));
    }
    order
}

pub fn keep_threshold(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * 4_294_967_296.0).min(u32::MAX as f64) as u32
}

/// A 32-bit integer hash with low bias ("lowbias32").
#[inline(always)]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(HASH32_MULTIPLIERS[0]);
    x ^= x >> 15;
    x = x.wrapping_mul(HASH32_MULTIPLIERS[1]);
    x ^ (x >> 16)
}

const HASH32_MULTIPLIERS: [u32; 2] = [0x7feb_352d, 0x846c_a68b];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_uniform_and_distinct() {
        let a = stream_key(7, "model.layers.0.mlp.up_proj.weight", 1);
        let b = stream_key(7, "model.layers.0.mlp.up_proj.weight", 2);
        let c = stream_key(8, "model.layers.0.mlp.up_proj.weight", 1);
        assert!(a != b && a != c);
        let n = 200_000;
        let mean = (0..n).map(|i| uniform(a, i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        let below = (0..n).filter(|&i| uniform(a, i) < 0.3).count() as f64 / n as f64;
        assert!((below - 0.3).abs() < 0.005, "{below}");
        let same = (0..1000)
            .filter(|&i| (uniform(a, i) < 0.5) == (uniform(b, i) < 0.5))
            .count();
        assert!((400..600).contains(&same), "{same}");
    }

    #[test]
    fn fast_draws_keep_the_requested_share() {
        let key = stream_key(3, "w", 0);
        for p in [0.05, 0.3, 0.9] {
            let t = keep_threshold(p);
            let n = 400_000u64;
            let kept = (0..n).filter(|&i| Draws::at(key, i).bits(i) < t).count() as f64 / n as f64;
            assert!((kept - p).abs() < 0.004, "{p}: {kept}");
        }
        // Neighbouring elements and other streams are uncorrelated.
        let other = stream_key(3, "w", 1);
        let t = keep_threshold(0.5);
        let both = (0..100_000u64)
            .filter(|&i| Draws::at(key, i).bits(i) < t && Draws::at(other, i).bits(i) < t)
            .count();
        assert!((both as f64 / 100_000.0 - 0.25).abs() < 0.01);
        let pairs = (0..100_000u64)
            .filter(|&i| Draws::at(key, i).bits(i) < t && Draws::at(key, i + 1).bits(i + 1) < t)
            .count();
        assert!((pairs as f64 / 100_000.0 - 0.25).abs() < 0.01);
        assert_ne!(
            Draws::at(key, 5).bits(5),
            Draws::at(key, 5 + (1 << 32)).bits(5 + (1 << 32))
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_draws_at_once_are_the_scalar_ones() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let draws = Draws::at(stream_key(4, "w", 0), 77);
        for first in [0u32, 1000, u32::MAX - 15] {
            let index: Vec<u32> = (first..=first + 15).collect();
            let mut out = [0u32; 16];
            // SAFETY: the CPU has AVX-512F (checked above); both arrays hold sixteen u32.
            unsafe {
                use std::arch::x86_64::*;
                let v = _mm512_loadu_si512(index.as_ptr().cast());
                _mm512_storeu_si512(out.as_mut_ptr().cast(), draws.bits16(v));
            }
            for (i, &d) in index.iter().zip(&out) {
                assert_eq!(d, draws.bits(*i as u64), "{i}");
            }
        }
        let a = 12345;
        let b = Draws::aimed_at(a, 99, 7);
        assert_eq!(Draws::from_parts(a, b).bits(99), 7);
    }
}
