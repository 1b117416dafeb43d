//! Helpers shared by the runtime's tests.
#![allow(dead_code)]

use fusekit_nn::eval::{evaluate, EvalOptions, Task};
use fusekit_nn::models::mlp::MlpConfig;
use fusekit_nn::weights::{save, Weights};
use fusekit_nn::{Device, Tensor};
use std::path::Path;

/// Accuracy of `model` (with `head`'s task head, if given) on the JSONL file `data`.
pub fn accuracy(model: &Path, data: &Path, head: Option<&Path>) -> f64 {
    let options = EvalOptions {
        batch_size: 3,
        head: head.map(|h| h.to_str().unwrap().to_string()),
        ..Default::default()
    };
    let task = Task::Classification {
        data: data.to_path_buf(),
    };
    evaluate(model.to_str().unwrap(), &task, &options, &|_, _| {})
        .unwrap()
        .value
}

/// A freshly initialised MLP classifier at `dir`.
pub fn mlp(dir: &Path, trunk_sizes: &[usize], num_labels: usize, seed: u64) {
    let config = MlpConfig {
        trunk_sizes: trunk_sizes.to_vec(),
        num_labels,
    };
    let tensors = config.init(seed, &Device::Cpu).unwrap();
    save(dir, &config.to_json(), &tensors).unwrap();
}

/// Backpropagates `loss` and checks that every trainable parameter of `w` gets a non-zero,
/// finite gradient; `what` names the model in failures.
pub fn assert_every_parameter_has_a_gradient(what: &str, w: &Weights, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    let mut count = 0;
    for (name, var) in w.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: `{name}` gets no gradient"));
        let size = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            size > 0.0 && size.is_finite(),
            "{what}: `{name}` gradient {size}"
        );
        count += 1;
    }
    assert!(count > 0, "{what}: no trainable parameters");
}
