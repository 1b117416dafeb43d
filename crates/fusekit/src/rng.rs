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

/// A uniform number in [0, 1) for element `index` of the stream `key`.
#[inline(always)]
pub fn uniform(key: u64, index: u64) -> f64 {
    let bits = mix(key.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

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
}
