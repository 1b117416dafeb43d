//! The Llama, Mistral and Qwen2 fixture decoders give the logits `transformers` gives
//! (`tests/data/decoder_reference.safetensors`, made by `scripts/decoder-reference.py`), and
//! every parameter receives a gradient.

mod common;

use candle_core::{Device, Tensor};
use common::assert_every_parameter_has_a_gradient;
use fusekit::checkpoint::safetensors_file::SafetensorsFile;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit_nn::models::llama::Llama;
use fusekit_nn::weights::Weights;
use std::path::PathBuf;

fn reference() -> SafetensorsFile {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/decoder_reference.safetensors");
    SafetensorsFile::open(&path).unwrap()
}

fn tensor(file: &SafetensorsFile, name: &str) -> Tensor {
    let e = &file.tensors[name];
    let bytes = &file.map[e.start..e.start + e.len];
    match e.dtype {
        Dtype::F32 => {
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            Tensor::from_vec(v, e.shape.as_slice(), &Device::Cpu).unwrap()
        }
        _ => {
            let v: Vec<u32> = bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                .collect();
            Tensor::from_vec(v, e.shape.as_slice(), &Device::Cpu).unwrap()
        }
    }
}

#[test]
fn decoders_match_transformers_and_pass_gradients() {
    let file = reference();
    let ids = tensor(&file, "input_ids");
    let mask = tensor(&file, "attention_mask");
    let keep = mask
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    for family in [Family::Llama, Family::Mistral, Family::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        write_model(&ModelSpec::tiny(family, Dtype::F32, 1), dir.path()).unwrap();
        let w = Weights::load(dir.path().to_str().unwrap(), &Device::Cpu, true).unwrap();
        let model = Llama::new(&w).unwrap();
        let logits = model.forward(&ids, &mask).unwrap();
        let expected = tensor(&file, &format!("{}.logits", family.name()));
        // Padded positions are not compared: their outputs are meaningless.
        let diff = ((&logits - &expected)
            .unwrap()
            .abs()
            .unwrap()
            .broadcast_mul(&keep))
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        eprintln!(
            "{}: largest logit difference from transformers {diff:e}",
            family.name()
        );
        assert!(diff <= 1e-4, "{}: {diff}", family.name());

        let loss = logits
            .broadcast_mul(&keep)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        assert_every_parameter_has_a_gradient(family.name(), &w, &loss);
    }
}
