//! The entry points of the fuzz targets (`fuzz/`), here so that the regression test replays
//! the stored corpus and crash reproducers through exactly the same checks without libFuzzer.
//! Each takes arbitrary bytes and panics only if a reader breaks one of its promises.

use crate::checkpoint::safetensors_file::Header;

/// The safetensors validator: whatever it accepts lies inside the file, without overlaps.
pub fn safetensors_header(bytes: &[u8]) {
    let Ok(header) = Header::from_bytes(bytes) else {
        return;
    };
    let mut ranges: Vec<(usize, usize)> = header
        .tensors
        .values()
        .map(|t| {
            let numel: usize = t.shape.iter().product();
            assert_eq!(
                numel * t.dtype.size(),
                t.len,
                "length matches shape and dtype"
            );
            (t.start, t.start + t.len)
        })
        .collect();
    ranges.sort();
    let data_start = ranges.first().map_or(bytes.len(), |r| r.0);
    assert!(data_start >= 8, "data after the header");
    for pair in ranges.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "no overlaps");
    }
    if let Some(last) = ranges.last() {
        assert_eq!(last.1, bytes.len(), "the data ends with the file");
    }
}

/// The index reader: every shard it accepts is a plain file name.
pub fn index(bytes: &[u8]) {
    let Ok(map) = crate::checkpoint::parse_index(bytes) else {
        return;
    };
    let mut seen = std::collections::HashSet::new();
    for (tensor, shard) in &map {
        assert!(seen.insert(tensor), "each tensor once");
        assert!(!shard.is_empty() && !shard.contains('/') && shard != "..");
    }
}

/// The config reader: text in, a recipe or an error out.
pub fn config(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = crate::config::recipe::parse(text, "fuzz");
    }
}
