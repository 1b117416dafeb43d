//! `ramplus_tl`: RAM+ with tensor-local statistics (arXiv:2601.13572), as in mergekit: `ram`, with
//! each model's unique entries scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, α), where
//! ρᵢ = (#active entries shared with other models) / max(#active entries only it has, ε),
//! counted over the tensor (one statistics pass). Defaults: r 0.1, α 0.2, ε 1e-5.
//! mergekit's λ (f32) promotes bf16 and f16 merges to f32 output; fusekit keeps the dtype.

use super::ram::{self, Plus, EPSILON};
use super::*;

pub struct RamPlusTl;

static SPEC: MethodSpec = MethodSpec {
    name: "ramplus_tl",
    summary: "ram with unique entries rescaled by the share of overlapping ones",
    reference: "https://arxiv.org/abs/2601.13572",
    params: &[
        EPSILON,
        ParamSpec {
            name: "r",
            scope: Scope::Global,
            ty: ParamType::Float,
            default: Some(Default::Float(0.1)),
            doc: "strength of the unique-entry rescale",
        },
        ParamSpec {
            name: "alpha",
            scope: Scope::Global,
            ty: ParamType::NonNegative,
            default: Some(Default::Float(0.2)),
            doc: "cap of the overlap ratio",
        },
    ],
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

impl Method for RamPlusTl {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let plus = Plus {
            r: ctx.params.float("r").unwrap_or(0.1),
            alpha: ctx.params.float("alpha").unwrap_or(0.2),
        };
        ram::merger(ctx, Some(plus))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn unique_entries_rescaled_by_overlap_ratio() {
        let base = vec![0.0f32; 5];
        // Model a: 2 unique, 2 shared active entries → ρ = 1 → λ = 1 + 0.1·min(1, 0.2) = 1.02.
        let a = vec![0.5, 0.3, 0.2, -0.1, 0.0];
        // Model b: 1 unique, 2 shared → ρ = 2 → λ = 1.02 too (capped by α).
        let b = vec![0.0, 0.0, 0.4, -0.3, 0.7];
        let p = params(
            &[
                ("epsilon", Scalar::Number(1e-5)),
                ("r", Scalar::Number(0.1)),
                ("alpha", Scalar::Number(0.2)),
            ],
            vec![vec![]; 3],
        );
        let out = run(&RamPlusTl, &[base, a, b], Some(0), p, 0);
        let expected = [0.5 * 1.02, 0.3 * 1.02, 0.3, -0.2, 0.7 * 1.02];
        for (o, e) in out.iter().zip(expected) {
            assert!((o - e).abs() < 1e-6, "{out:?}");
        }
    }
}
