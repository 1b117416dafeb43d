//! `della_linear`: DELLA's MagPrune (see `della`), then task arithmetic without sign consensus
//! (Deep et al., arXiv:2406.11617). out = base + λ·Σᵢ wᵢ·δ̂ᵢ (÷ Σᵢ wᵢ with `normalize`).
//! Defaults: density 1, ε 0.15, normalize false, rescale true, λ 1.

use super::della::EPSILON;
use super::gta::{self, gta_params, Sparsify, Variant};
use super::*;

pub struct DellaLinear;

static SPEC: MethodSpec = MethodSpec {
    name: "della_linear",
    summary: "rank-based random drop and rescale, then task arithmetic",
    reference: "https://arxiv.org/abs/2406.11617",
    params: gta_params!(false, true, EPSILON),
    base: BasePolicy::Required,
    min_inputs: 1,
    max_inputs: None,
};

impl Method for DellaLinear {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        gta::merger(
            Variant {
                sparsify: Sparsify::RankedRandom,
                consensus: false,
            },
            ctx,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::della::tests::run_pruned;
    use super::*;

    #[test]
    fn matches_dense_reference() {
        for (rows, row_len) in [(30, 50), (3, 5000), (1, 2)] {
            let (x, out, pruned) = run_pruned(&DellaLinear, rows, row_len);
            for i in 0..rows * row_len {
                let want = x[0][i] + 0.7 * pruned[0][i] + 0.5 * pruned[1][i];
                assert!((out[i] - want).abs() < 1e-6, "{i}: {} vs {want}", out[i]);
            }
        }
    }
}
