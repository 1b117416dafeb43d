//! Every parameter of every model family receives a non-zero gradient: the models are built only
//! from operations with a backward pass (candle's fused kernels would silently cut some off).

mod common;

use candle_core::{DType, Device, Tensor};
use common::assert_every_parameter_has_a_gradient;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit_nn::models::bert::{mean_pool, Bert};
use fusekit_nn::models::mlp::{Mlp, MlpConfig};
use fusekit_nn::weights::{save, Weights};

#[test]
fn bert_passes_gradients_to_every_parameter() {
    let dir = tempfile::tempdir().unwrap();
    write_model(&ModelSpec::tiny(Family::Bert, Dtype::F32, 1), dir.path()).unwrap();
    let w = Weights::load(dir.path().to_str().unwrap(), &Device::Cpu, true).unwrap();
    let bert = Bert::new(&w).unwrap();
    let ids = Tensor::new(&[[2u32, 7, 9, 11, 3], [2, 5, 3, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let out = bert.forward(&ids, &mask).unwrap();
    let pooled = mean_pool(&out.last_hidden_state, &mask).unwrap();
    let loss = (pooled.sqr().unwrap().sum_all().unwrap()
        + out.pooler_output.unwrap().sum_all().unwrap())
    .unwrap();
    assert_every_parameter_has_a_gradient("bert", &w, &loss);
}

#[test]
fn mlp_passes_gradients_to_every_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let config = MlpConfig {
        trunk_sizes: vec![6, 8, 5],
        num_labels: 3,
    };
    let tensors = config.init(3, &Device::Cpu).unwrap();
    save(dir.path(), &config.to_json(), &tensors).unwrap();
    let w = Weights::load(dir.path().to_str().unwrap(), &Device::Cpu, true).unwrap();
    let mlp = Mlp::new(&w).unwrap();
    assert_eq!(mlp.config, config);
    let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
        .unwrap()
        .reshape((4, 6))
        .unwrap()
        .affine(0.1, -1.0)
        .unwrap();
    let labels = Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap();
    let logits = mlp.forward(&x).unwrap();
    assert_eq!(logits.dims(), &[4, 3]);
    assert_eq!(logits.dtype(), DType::F32);
    let loss = fusekit_nn::ops::cross_entropy(&logits, &labels).unwrap();
    assert_every_parameter_has_a_gradient("mlp", &w, &loss);
}
