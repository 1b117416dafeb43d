//! Helpers shared by the integration tests.
#![allow(dead_code)]

use fusekit::checkpoint::safetensors_file::SafetensorsFile;
use fusekit::checkpoint::Checkpoint;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor read back as its dtype and f32 values (plus raw bits for ulp comparisons).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub bits: Vec<u32>,
}

pub fn load_model(dir: &Path) -> BTreeMap<String, Loaded> {
    let model = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let names: Vec<String> = model.tensor_names().map(str::to_string).collect();
    names
        .into_iter()
        .map(|n| {
            let s = model.source(&n).unwrap();
            let loaded = decode(s.dtype, &s.shape, s.bytes(0, s.numel()));
            (n, loaded)
        })
        .collect()
}

pub fn load_file(path: &Path) -> BTreeMap<String, Loaded> {
    let file = SafetensorsFile::open(path).unwrap();
    file.tensors
        .iter()
        .map(|(n, e)| {
            (
                n.clone(),
                decode(e.dtype, &e.shape, &file.map[e.start..e.start + e.len]),
            )
        })
        .collect()
}

fn decode(dtype: Dtype, shape: &[usize], bytes: &[u8]) -> Loaded {
    let n: usize = shape.iter().product();
    let (values, bits) = match dtype {
        Dtype::BF16 | Dtype::F16 | Dtype::F32 => {
            let mut v = vec![0f32; n];
            fusekit::kernels::convert::decode(dtype, bytes, &mut v);
            let bits = bytes
                .chunks_exact(dtype.size())
                .map(|c| {
                    if c.len() == 2 {
                        u16::from_le_bytes([c[0], c[1]]) as u32
                    } else {
                        u32::from_le_bytes([c[0], c[1], c[2], c[3]])
                    }
                })
                .collect();
            (v, bits)
        }
        _ => (Vec::new(), bytes.iter().map(|b| *b as u32).collect()),
    };
    Loaded {
        dtype,
        shape: shape.to_vec(),
        values,
        bits,
    }
}

/// Distance in units in the last place between two stored floats of the same dtype.
pub fn ulps(dtype: Dtype, a: u32, b: u32) -> u64 {
    let key = |x: u32| -> i64 {
        let (sign, mag) = match dtype {
            Dtype::F32 => (x >> 31, (x & 0x7FFF_FFFF) as i64),
            _ => (x >> 15, (x & 0x7FFF) as i64),
        };
        if sign == 1 {
            -mag
        } else {
            mag
        }
    };
    (key(a) - key(b)).unsigned_abs()
}

pub fn make(dir: &Path, family: Family, dtype: Dtype, seed: u64, finetune: Option<(u64, f32)>) {
    let mut spec = ModelSpec::tiny(family, dtype, seed);
    if let Some((s, scale)) = finetune {
        spec = spec.finetuned(s, scale);
    }
    write_model(&spec, dir).unwrap();
}

/// Merges `yaml` (model paths written as `./name`, resolved inside `dir`) into `dir/out`.
pub fn merge_yaml(
    dir: &Path,
    yaml: &str,
    out: &str,
    options: &fusekit::MergeOptions,
) -> fusekit::Result<fusekit::plan::Plan> {
    let text = yaml.replace("./", &format!("{}/", dir.display()));
    let config = dir.join(format!("{out}.yml"));
    std::fs::write(&config, text).unwrap();
    fusekit::merge(&config, &dir.join(out), options, &())
}

/// One unit in the last place of `dtype` at magnitude `x` (the spacing of values near it).
pub fn ulp_at(dtype: Dtype, x: f32) -> f32 {
    let (mantissa, min_exp) = match dtype {
        Dtype::BF16 => (7, -133),
        Dtype::F16 => (10, -24),
        _ => (23, -149),
    };
    let exp = if x == 0.0 {
        i32::MIN / 2
    } else {
        x.abs().log2().floor() as i32
    };
    2f32.powi((exp - mantissa).max(min_exp))
}

/// Each model's task vector of tensor `name` against `base`.
#[allow(dead_code)]
pub fn task_vectors(
    base: &BTreeMap<String, Loaded>,
    models: &[BTreeMap<String, Loaded>],
    name: &str,
) -> Vec<Vec<f32>> {
    models
        .iter()
        .map(|m| {
            m[name]
                .values
                .iter()
                .zip(&base[name].values)
                .map(|(x, b)| x - b)
                .collect()
        })
        .collect()
}

/// Every file under `dir`, recursively, with a hash of its bytes (`.yml` configs left out:
/// tests write those).
pub fn checksums(dir: &Path) -> BTreeMap<std::path::PathBuf, u64> {
    use std::hash::{Hash, Hasher};
    let mut sums = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                pending.push(path);
            } else if path.extension().is_none_or(|e| e != "yml") {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                std::fs::read(&path).unwrap_or_default().hash(&mut hasher);
                sums.insert(path, hasher.finish());
            }
        }
    }
    sums
}

/// Runs a merge of `config` into `dir/bad` that must fail: the message mentions every one of
/// `expect`, no output appears, and no file under `dir` changes.
pub fn refused(dir: &Path, config: &str, expect: &[&str]) -> String {
    refused_with(dir, config, expect, &Default::default())
}

pub fn refused_with(
    dir: &Path,
    config: &str,
    expect: &[&str],
    options: &fusekit::MergeOptions,
) -> String {
    let before = checksums(dir);
    let err = merge_yaml(dir, config, "bad", options)
        .unwrap_err()
        .to_string();
    for e in expect {
        assert!(err.contains(e), "`{err}` should mention `{e}`");
    }
    assert!(!dir.join("bad").exists());
    assert_eq!(before, checksums(dir), "files changed or were left behind");
    err
}
