//! `nuslerp`: SLERP between two models by weight, optionally of their task vectors and
//! optionally per row or per column (mergekit's "NuSLERP").
//!
//! t = w₂/(w₁ + w₂) (0.5 when |w₁ + w₂| < 1e-6). With a base the two task vectors are
//! interpolated and the base added back. Vectors are the whole tensor (`nuslerp_flatten`, the
//! default), else its rows (last dimension), or with `nuslerp_row_wise` its columns (dimension 0,
//! as mergekit's transpose does). Per vector: v̂ = v/max(‖v‖, 1e-7), cos θ = clamp(v̂₀·v̂₁, −1, 1),
//! out = (sin((1 − t)θ)·v₀ + sin(tθ)·v₁)/sin θ, or the lerp where 1 − cos²θ ≤ 1e-16.
//! Norms and dot products per vector are accumulated in f64, one statistics pass.

use super::*;
use crate::error::Error;
use crate::kernels::dot3_f64;

pub struct Nuslerp;

static SPEC: MethodSpec = MethodSpec {
    name: "nuslerp",
    summary: "slerp of two models by weight, flattened, per row or per column",
    reference: "https://github.com/arcee-ai/mergekit",
    params: &[
        ParamSpec {
            name: "weight",
            scope: Scope::NonBase,
            ty: ParamType::Float,
            default: None,
            doc: "weight of each of the two models",
        },
        ParamSpec {
            name: "nuslerp_flatten",
            scope: Scope::Global,
            ty: ParamType::Bool,
            default: Some(Default::Bool(true)),
            doc: "one vector per tensor",
        },
        ParamSpec {
            name: "nuslerp_row_wise",
            scope: Scope::Global,
            ty: ParamType::Bool,
            default: Some(Default::Bool(false)),
            doc: "without flatten: vectors along dimension 0 instead of the last",
        },
    ],
    base: BasePolicy::Optional,
    min_inputs: 2,
    max_inputs: Some(3),
};

/// How elements group into the vectors being interpolated.
#[derive(Clone, Copy)]
enum Grouping {
    Whole,
    /// Consecutive runs of this length (rows of the last dimension).
    Runs(usize),
    /// Element i belongs to vector i mod this (columns along dimension 0).
    Strided(usize),
}

impl Grouping {
    fn of(self, index: usize) -> usize {
        match self {
            Grouping::Whole => 0,
            Grouping::Runs(len) => index / len,
            Grouping::Strided(count) => index % count,
        }
    }
}

struct NuslerpMerger {
    base: Option<usize>,
    pair: [usize; 2],
    t: f64,
    grouping: Grouping,
    /// Per vector: ‖v₀‖², ‖v₁‖², v₀·v₁.
    sums: Vec<[f64; 3]>,
    coefficients: Vec<[f32; 2]>,
}

impl Method for Nuslerp {
    fn spec(&self) -> &'static MethodSpec {
        &SPEC
    }

    fn merger(&self, ctx: &TensorContext) -> Result<Box<dyn TensorMerger>> {
        let others: Vec<usize> = (0..ctx.n_inputs).filter(|&i| Some(i) != ctx.base).collect();
        let [a, b] = others[..] else {
            return Err(Error::tensor(
                ctx.name,
                format!(
                    "nuslerp takes exactly 2 models besides the base, got {}",
                    others.len()
                ),
            ));
        };
        let (wa, wb) = (
            ctx.params.input_float(a, "weight").unwrap_or(0.0),
            ctx.params.input_float(b, "weight").unwrap_or(0.0),
        );
        let t = if (wa + wb).abs() < 1e-6 {
            0.5
        } else {
            wb / (wa + wb)
        };
        let numel = ctx.numel.max(1);
        let grouping = match (
            ctx.params.flag("nuslerp_flatten").unwrap_or(true),
            ctx.params.flag("nuslerp_row_wise").unwrap_or(false),
        ) {
            (true, _) => Grouping::Whole,
            (false, false) => Grouping::Runs(ctx.shape.last().copied().unwrap_or(numel).max(1)),
            (false, true) => {
                Grouping::Strided(numel / ctx.shape.first().copied().unwrap_or(numel).max(1))
            }
        };
        let vectors = match grouping {
            Grouping::Whole => 1,
            Grouping::Runs(len) => numel.div_ceil(len),
            Grouping::Strided(count) => count.max(1),
        };
        Ok(Box::new(NuslerpMerger {
            base: ctx.base,
            pair: [a, b],
            t,
            grouping,
            sums: vec![[0.0; 3]; vectors],
            coefficients: Vec::new(),
        }))
    }
}

impl NuslerpMerger {
    /// The pair's (base-relative) values over one block.
    fn relative_pair(&self, inputs: &[&[f32]]) -> (Vec<f32>, Vec<f32>) {
        let relative = |m: usize| -> Vec<f32> {
            match self.base {
                Some(b) => inputs[m]
                    .iter()
                    .zip(inputs[b])
                    .map(|(x, y)| x - y)
                    .collect(),
                None => inputs[m].to_vec(),
            }
        };
        (relative(self.pair[0]), relative(self.pair[1]))
    }

    /// The block's runs of elements that share a vector (whole tensor or rows), as
    /// (vector, range within the block).
    fn segments(
        &self,
        start: usize,
        len: usize,
    ) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        let mut j = 0;
        std::iter::from_fn(move || {
            if j >= len {
                return None;
            }
            let group = self.grouping.of(start + j);
            let end = match self.grouping {
                Grouping::Runs(run) => len.min((group + 1) * run - start),
                _ => len,
            };
            let segment = (group, j..end);
            j = end;
            Some(segment)
        })
    }
}

impl TensorMerger for NuslerpMerger {
    fn wants_pass(&self, pass: usize) -> bool {
        pass == 0
    }

    fn observe(&mut self, _pass: usize, start: usize, inputs: &[&[f32]]) {
        let (a, b) = self.relative_pair(inputs);
        match self.grouping {
            Grouping::Strided(_) => {
                for j in 0..a.len() {
                    let (x, y) = (a[j] as f64, b[j] as f64);
                    let s = &mut self.sums[self.grouping.of(start + j)];
                    s[0] += x * x;
                    s[1] += y * y;
                    s[2] += x * y;
                }
            }
            _ => {
                let segments: Vec<_> = self.segments(start, a.len()).collect();
                for (group, range) in segments {
                    let (x, y) = (&a[range.clone()], &b[range]);
                    let s = &mut self.sums[group];
                    let [xx, yy, xy] = dot3_f64(x, y);
                    s[0] += xx;
                    s[1] += yy;
                    s[2] += xy;
                }
            }
        }
    }

    fn end_pass(&mut self, _pass: usize) -> Result<()> {
        let t = self.t;
        self.coefficients = self
            .sums
            .iter()
            .map(|&[aa, bb, ab]| {
                let cos = (ab / (aa.sqrt().max(1e-7) * bb.sqrt().max(1e-7))).clamp(-1.0, 1.0);
                if 1.0 - cos * cos <= 1e-16 {
                    return [(1.0 - t) as f32, t as f32];
                }
                let theta = cos.acos();
                let s = theta.sin();
                [
                    (((1.0 - t) * theta).sin() / s) as f32,
                    ((t * theta).sin() / s) as f32,
                ]
            })
            .collect();
        Ok(())
    }

    fn apply(&self, start: usize, inputs: &[&[f32]], out: &mut [f32]) {
        let (a, b) = self.relative_pair(inputs);
        match self.grouping {
            Grouping::Strided(_) => {
                for (j, o) in out.iter_mut().enumerate() {
                    let [ca, cb] = self.coefficients[self.grouping.of(start + j)];
                    *o = ca * a[j] + cb * b[j];
                }
            }
            _ => {
                for (group, range) in self.segments(start, a.len()) {
                    let [ca, cb] = self.coefficients[group];
                    for ((o, x), y) in out[range.clone()]
                        .iter_mut()
                        .zip(&a[range.clone()])
                        .zip(&b[range])
                    {
                        *o = ca * x + cb * y;
                    }
                }
            }
        }
        if let Some(base) = self.base {
            out.iter_mut().zip(inputs[base]).for_each(|(o, x)| *o += x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn slerp(t: f64, a: &[f64], b: &[f64]) -> Vec<f64> {
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-7);
        let cos = (a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b)))
            .clamp(-1.0, 1.0);
        let th = cos.acos();
        a.iter()
            .zip(b)
            .map(|(x, y)| (((1.0 - t) * th).sin() * x + (t * th).sin() * y) / th.sin())
            .collect()
    }

    fn check(flatten: bool, row_wise: bool) {
        let (rows, cols) = (40, 300);
        let n = rows * cols;
        let (a, b) = (data(n, 1, 1.0), data(n, 2, 1.0));
        let p = params(
            &[
                ("nuslerp_flatten", Scalar::Bool(flatten)),
                ("nuslerp_row_wise", Scalar::Bool(row_wise)),
            ],
            vec![
                vec![("weight", Scalar::Number(1.0))],
                vec![("weight", Scalar::Number(3.0))],
            ],
        );
        let keys = [0u64; 2];
        let shape = [rows, cols];
        let ctx = TensorContext {
            name: "w",
            numel: n,
            shape: &shape,
            n_inputs: 2,
            base: None,
            params: &p,
            rng_keys: &keys,
            compute: None,
            memory: 1 << 30,
            models: &[],
            model_stats: None,
        };
        let out = run_ctx(&Nuslerp, &[a.clone(), b.clone()], &ctx);
        let t = 0.75;
        let (a64, b64): (Vec<f64>, Vec<f64>) = (
            a.iter().map(|x| *x as f64).collect(),
            b.iter().map(|x| *x as f64).collect(),
        );
        let vectors: Vec<Vec<usize>> = match (flatten, row_wise) {
            (true, _) => vec![(0..n).collect()],
            (false, false) => (0..rows)
                .map(|r| (r * cols..(r + 1) * cols).collect())
                .collect(),
            (false, true) => (0..cols)
                .map(|c| (0..rows).map(|r| r * cols + c).collect())
                .collect(),
        };
        for idx in vectors {
            let pick = |v: &[f64]| idx.iter().map(|&i| v[i]).collect::<Vec<f64>>();
            let expected = slerp(t, &pick(&a64), &pick(&b64));
            for (k, &i) in idx.iter().enumerate() {
                assert!(
                    (out[i] as f64 - expected[k]).abs() < 1e-5,
                    "flatten={flatten} row_wise={row_wise} {i}"
                );
            }
        }
    }

    #[test]
    fn matches_slerp_per_tensor_row_and_column() {
        check(true, false);
        check(false, false);
        check(false, true);
    }
}
