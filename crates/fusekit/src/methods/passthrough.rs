//! `passthrough`: copy one input per tensor, optionally multiplied by its `scale`. With `slices`
//! it stacks or reorders layers (frankenmerges); the planner renumbers the layers.

use super::*;

pub struct Passthrough;

static SPEC: MethodSpec = MethodSpec {
    name: "passthrough",
    summary: "copy tensors (layer stacking with slices), optional scale",
    reference: "https://github.com/arcee-ai/mergekit",
    params: &[ParamSpec {
        name: "scale",
        scope: Scope::PerInput,
        ty: ParamType::Float,
        default: Some(Default::Unset),
        doc: "multiplier of the copied tensor",
    }],
    base: BasePolicy::Optional,
    min_inputs: 1,
    max_inputs: Some(1),
};

struct PassthroughMerger {
    scale: Option<f32>,
}

impl Method for Passthrough {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        Ok(Box::new(PassthroughMerger {
            scale: ctx.params.input_float(0, "scale").map(|s| s as f32),
        }))
    }
}

impl TensorMerger for PassthroughMerger {
    fn apply(&self, _start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        match self.scale {
            Some(s) => out.iter_mut().zip(inputs[0]).for_each(|(o, x)| *o = x * s),
            None => out.copy_from_slice(inputs[0]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn copies_and_scales() {
        let x = data(5000, 1, 1.0);
        assert_eq!(
            run(
                &Passthrough,
                std::slice::from_ref(&x),
                None,
                params(&[], vec![vec![]]),
                0
            ),
            x
        );
        let scaled = run(
            &Passthrough,
            std::slice::from_ref(&x),
            None,
            params(&[], vec![vec![("scale", Scalar::Number(0.0))]]),
            0,
        );
        assert!(scaled.iter().all(|v| *v == 0.0));
    }
}
