//! Assignment of output tensors to shards and byte offsets, known before any data is read.

use crate::dtype::Dtype;

/// `model.safetensors` for one shard, else `model-0000i-of-0000n.safetensors`.
pub fn shard_name(index: usize, count: usize) -> String {
    if count == 1 {
        crate::checkpoint::SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
    }
}

/// Greedy fill in output order: a new shard starts when the next tensor would pass `max_bytes`.
pub fn assign(sizes: &[usize], max_bytes: usize) -> Vec<usize> {
    let mut shard = 0;
    let mut filled = 0;
    sizes
        .iter()
        .map(|&size| {
            if filled > 0 && filled + size > max_bytes {
                shard += 1;
                filled = 0;
            }
            filled += size;
            shard
        })
        .collect()
}

/// Offsets inside one shard's data section, ordered as the `safetensors` crate writes them
/// (larger dtypes first, then by name) so every tensor stays naturally aligned.
pub fn layout(tensors: &[(&str, Dtype, usize)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        tensors[b]
            .1
            .size()
            .cmp(&tensors[a].1.size())
            .then(tensors[a].0.cmp(tensors[b].0))
    });
    let mut offsets = vec![0; tensors.len()];
    let mut cursor = 0;
    for i in order {
        offsets[i] = cursor;
        cursor += tensors[i].2;
    }
    offsets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_shards_greedily() {
        assert_eq!(assign(&[4, 4, 4, 10, 1], 8), vec![0, 0, 1, 2, 3]);
        assert_eq!(shard_name(0, 1), "model.safetensors");
        assert_eq!(shard_name(1, 3), "model-00002-of-00003.safetensors");
    }

    #[test]
    fn layout_aligns_wide_dtypes_first() {
        let offsets = layout(&[
            ("b", Dtype::BF16, 6),
            ("a", Dtype::F32, 8),
            ("c", Dtype::I64, 8),
        ]);
        assert_eq!(offsets, vec![16, 8, 0]);
    }
}
