//! Helpers shared by the runtime's tests.
#![allow(dead_code)]

use fusekit_nn::weights::Weights;
use fusekit_nn::Tensor;

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
