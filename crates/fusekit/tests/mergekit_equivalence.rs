//! fusekit against mergekit 0.1.5 on every case of tests/mergekit/cases.json. The reference
//! outputs were produced by scripts/mergekit-reference.py on the same deterministic inputs.
//! Deterministic methods must agree within 1 ulp of the output dtype; DARE (random masks) must
//! agree on keep rate and L1 mass.

mod common;

use common::*;
use fusekit::checkpoint::Checkpoint;
use fusekit::dtype::Dtype;
use fusekit::extract_lora::{extract_lora, ExtractOptions};
use fusekit::fixtures::{write_lora, write_model, Family, LoraSpec, ModelSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Report {
    name: String,
    tensors: usize,
    max_ulps: u64,
    off_by_one: usize,
    /// Elements more than 1 ulp apart but within 1 ulp at the operands' magnitude.
    cancellations: usize,
    /// Elements whose |δ| equals a TIES threshold, where mergekit's unstable sort picks arbitrarily.
    ties: usize,
    /// Elements where the kept set differs because of such ties.
    tie_mismatches: usize,
    elements: usize,
}

/// The ranks (k-th largest |δ|, 1-based) where a magnitude-selecting method's kept set has an
/// edge: TIES keeps the top k; breadcrumbs keeps ranks (top, top + m] below the outliers.
fn selection_edges(method: &str, density: f64, gamma: f64, n: usize) -> Vec<usize> {
    match method {
        "ties" => vec![((density * n as f64) as usize).max(1)],
        "breadcrumbs" | "breadcrumbs_ties" => {
            let target = (density * n as f64) as usize;
            let top = n - n.saturating_sub(target + (gamma * n as f64) as usize) - target;
            [top, top + target]
                .into_iter()
                .filter(|&r| (1..=n).contains(&r))
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Methods that elect a sign per element from a sum of task vectors.
fn elects_signs(method: &str) -> bool {
    matches!(method, "ties" | "breadcrumbs_ties" | "sce")
}

/// Positions where some model's task vector sits exactly at a selection edge, so that which of
/// the equal elements are kept is torch's arbitrary choice (its argsort is unstable), or where a
/// sign election cancels below the compute dtype's resolution.
fn tie_positions(plan: &fusekit::plan::Plan, tensor: &str) -> Vec<bool> {
    let task = plan.tensors.iter().find(|t| t.name == tensor).unwrap();
    let n = task.numel();
    let mut ties = vec![false; n];
    let method = plan.method.spec().name;
    let fusekit::plan::Work::Merge(m) = &task.work else {
        return ties;
    };
    let Some(base) = m.base else {
        return ties;
    };
    let value = |input: &fusekit::plan::MergeInput| -> Vec<f32> {
        let mut v = vec![0f32; n];
        fusekit::kernels::convert::decode(input.source.dtype, input.source.bytes(0, n), &mut v);
        v
    };
    let b = value(&m.inputs[base]);
    let mut election = vec![(0f32, 0f32); n];
    for (i, input) in m.inputs.iter().enumerate().filter(|(i, _)| *i != base) {
        let density = m.params.input_float(i, "density").unwrap_or(1.0);
        let gamma = m.params.input_float(i, "gamma").unwrap_or(0.0);
        let edges = if density < 1.0 {
            selection_edges(method, density, gamma, n)
        } else {
            Vec::new()
        };
        if edges.is_empty() && !elects_signs(method) {
            continue;
        }
        let x = value(input);
        let mags: Vec<f32> = x.iter().zip(&b).map(|(x, b)| (x - b).abs()).collect();
        let values: Vec<f32> = edges
            .iter()
            .map(|&r| *mags.clone().select_nth_unstable_by(n - r, f32::total_cmp).1)
            .collect();
        let lowest_kept = values.last().copied().unwrap_or(0.0);
        let w = m.params.input_float(i, "weight").unwrap_or(1.0) as f32;
        for (j, mag) in mags.iter().enumerate() {
            ties[j] |= values.contains(mag);
            if *mag >= lowest_kept {
                let d = w * (x[j] - b[j]);
                election[j].0 += d;
                election[j].1 = election[j].1.max(d.abs());
            }
        }
    }
    for (j, (sum, largest)) in election.iter().enumerate() {
        ties[j] |= *largest > 0.0 && sum.abs() <= 2.0 * common::ulp_at(task.dtype, *largest);
    }
    ties
}

/// The adapter `fusekit make-lora` writes for the reference script, from the same fixture code.
fn make_lora(model: &Path, spec: &serde_json::Value, out: &Path) {
    let map = |key: &str| -> BTreeMap<String, f64> {
        spec.get(key)
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let lora = LoraSpec {
        rank: spec["rank"].as_u64().unwrap() as usize,
        alpha: spec["alpha"].as_f64().unwrap(),
        seed: spec["seed"].as_u64().unwrap(),
        targets: spec["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect(),
        rank_pattern: map("rank_pattern")
            .into_iter()
            .map(|(k, v)| (k, v as usize))
            .collect(),
        alpha_pattern: map("alpha_pattern"),
        use_rslora: false,
    };
    let checkpoint = Checkpoint::open(model.to_str().unwrap()).unwrap();
    write_lora(&checkpoint, &lora, out).unwrap();
}

/// Puts mergekit's vocabulary rows in fusekit's token order: mergekit numbers the tokens a union
/// adds in a hash map's order, so rows are matched by token (padding rows by position).
fn align_vocabulary(ours: &Path, their_vocab: &Path, theirs: &mut BTreeMap<String, Loaded>) {
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let tokenizer = read(&ours.join("tokenizer.json"));
    let mut our_ids: BTreeMap<String, u64> = tokenizer["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (t.clone(), id.as_u64().unwrap()))
        .collect();
    for t in tokenizer["added_tokens"].as_array().unwrap() {
        our_ids.insert(
            t["content"].as_str().unwrap().into(),
            t["id"].as_u64().unwrap(),
        );
    }
    let their_ids = read(their_vocab);
    assert_eq!(
        our_ids.len(),
        their_ids.as_object().unwrap().len(),
        "vocabulary sizes"
    );
    let mut theirs_of = vec![usize::MAX; our_ids.len()];
    for (token, id) in &our_ids {
        let theirs = their_ids[token.as_str()]
            .as_u64()
            .unwrap_or_else(|| panic!("mergekit's vocabulary lacks `{token}`"));
        theirs_of[*id as usize] = theirs as usize;
    }
    for (name, t) in theirs.iter_mut() {
        if !fusekit::vocab::is_vocabulary_tensor(name) {
            continue;
        }
        let cols = t.shape[1];
        let row = |r: usize| theirs_of.get(r).copied().unwrap_or(r);
        t.bits = (0..t.shape[0])
            .flat_map(|r| t.bits[row(r) * cols..(row(r) + 1) * cols].to_vec())
            .collect();
        let values: Vec<f32> = (0..t.shape[0])
            .flat_map(|r| t.values[row(r) * cols..(row(r) + 1) * cols].to_vec())
            .collect();
        t.values = values;
    }
}

/// One input of a case: a model, a LoRA adapter made for one, or an adapter extracted from one.
fn make_input(dir: &Path, family: Family, dtype: Dtype, out: &Path, spec: &serde_json::Value) {
    let path = |key: &serde_json::Value| dir.join(key.as_str().unwrap());
    if let Some(of) = spec.get("lora_of") {
        make_lora(&path(of), spec, out);
    } else if let Some(of) = spec.get("extract_of") {
        let options = ExtractOptions {
            rank: spec["rank"].as_u64().unwrap() as usize,
            rank_pattern: Vec::new(),
            embeddings: false,
            dtype: Dtype::F32,
            force: false,
        };
        let model = path(of);
        let base = path(&spec["from"]);
        extract_lora(
            model.to_str().unwrap(),
            base.to_str().unwrap(),
            out,
            &options,
        )
        .unwrap();
    } else {
        let mut model = ModelSpec::tiny(family, dtype, spec["seed"].as_u64().unwrap());
        if let Some(f) = spec.get("finetune") {
            model = model.finetuned(f[0].as_u64().unwrap(), f[1].as_f64().unwrap() as f32);
        }
        model.tokenizer_variant = spec.get("tokenizer").map_or(0, |v| v.as_u64().unwrap());
        write_model(&model, out).unwrap();
    }
}

fn run_case(case: &serde_json::Value) -> Report {
    let name = case["name"].as_str().unwrap();
    let family = Family::parse(case["family"].as_str().unwrap()).unwrap();
    let dtype = Dtype::from_config(case["dtype"].as_str().unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (model, spec) in case["models"].as_object().unwrap() {
        make_input(dir.path(), family, dtype, &dir.path().join(model), spec);
    }
    let plan = merge_yaml(
        dir.path(),
        case["config"].as_str().unwrap(),
        "out",
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let ours = load_model(&dir.path().join("out"));
    let reference_dir = repo().join("tests/mergekit/reference");
    let mut theirs = load_file(&reference_dir.join(format!("{name}.safetensors")));
    let their_vocab = reference_dir.join(format!("{name}.vocab.json"));
    if their_vocab.is_file() {
        align_vocabulary(&dir.path().join("out"), &their_vocab, &mut theirs);
    }
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "{name}: tensor names"
    );

    let their_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reference_dir.join(format!("{name}.config.json"))).unwrap(),
    )
    .unwrap();
    let our_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/config.json")).unwrap())
            .unwrap();
    for key in ["num_hidden_layers", "n_layer"] {
        assert_eq!(
            our_config.get(key),
            their_config.get(key),
            "{name}: config `{key}`"
        );
    }

    let mut report = Report {
        name: name.to_string(),
        tensors: ours.len(),
        max_ulps: 0,
        off_by_one: 0,
        cancellations: 0,
        ties: 0,
        tie_mismatches: 0,
        elements: 0,
    };
    let statistical = case["compare"] == "statistical";
    let mask = case["compare"] == "mask";
    // Where a coefficient comes from a whole-tensor (or whole-row) f32 reduction in mergekit and
    // an f64 one here (model_stock's cosines), the coefficient differs by mergekit's summation
    // error, up to ~1e-6 relative: 16 ulps at the operands' magnitude instead of 4.
    let allowed_ulps = if case["compare"] == "reduction" {
        16.0
    } else {
        4.0
    };
    let method = plan.method.spec().name;
    let is_ties = elects_signs(method) || !selection_edges(method, 0.5, 0.01, 100).is_empty();
    let base = (statistical || mask).then(|| load_model(&dir.path().join("base")));
    let inputs: Vec<_> = case["models"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, spec)| spec.get("lora_of").is_none() && spec.get("extract_of").is_none())
        .map(|(m, _)| load_model(&dir.path().join(m)))
        .collect();
    for (tensor, a) in &ours {
        let b = &theirs[tensor];
        assert_eq!(
            (a.dtype, &a.shape),
            (b.dtype, &b.shape),
            "{name}: `{tensor}` dtype/shape"
        );
        if a.values.is_empty() {
            assert_eq!(a.bits, b.bits, "{name}: `{tensor}` copied bytes");
            continue;
        }
        report.elements += a.values.len();
        if mask {
            let other = &inputs[1][tensor];
            let max_flips = case["max_flips"].as_f64().unwrap_or(0.01);
            let flips = compare_mask(
                name,
                max_flips,
                tensor,
                &base.as_ref().unwrap()[tensor],
                other,
                a,
                b,
            );
            report.tie_mismatches += flips;
            report.ties += flips;
            continue;
        }
        if let Some(base) = &base {
            compare_dare(name, tensor, &base[tensor].values, &a.values, &b.values);
            continue;
        }
        let ties = tie_positions(&plan, tensor);
        report.ties += ties.iter().filter(|t| **t).count();
        let operands: Vec<&Loaded> = inputs
            .iter()
            .filter_map(|m| m.get(tensor))
            .filter(|t| t.shape == a.shape && !t.values.is_empty())
            .collect();
        // A vocabulary tensor in a new vocabulary has no operand at the same index; its rows
        // (and padding means over them) come from rows of the tensor's magnitude.
        let floor = if operands.is_empty() {
            b.values.iter().fold(0f32, |m, v| m.max(v.abs()))
        } else {
            0.0
        };
        for (i, (x, y)) in a.bits.iter().zip(&b.bits).enumerate() {
            let d = ulps(a.dtype, *x, *y);
            if d > 1 && ties[i] {
                report.tie_mismatches += 1;
                continue;
            }
            if d > 1 {
                // mergekit rounds every intermediate (task vector, weighted delta, sum, quotient)
                // to the compute dtype; fusekit keeps them in f32. Where the result cancels to near
                // zero those roundings show as many ulps of the small result, yet stay within the
                // ~4 roundings' worth at the magnitude of the operands.
                // A LoRA update is an operand the models on disk do not show: the result's own
                // magnitude stands in (it only matters where it exceeds the stored operands').
                let magnitude = operands
                    .iter()
                    .map(|t| t.values[i].abs())
                    .fold(b.values[i].abs().max(floor), f32::max);
                let diff = (a.values[i] - b.values[i]).abs();
                if is_ties && diff > 4.0 * ulp_at(a.dtype, magnitude) {
                    // Masks differ: a tie in mergekit's bf16 arithmetic that f32 does not see.
                    report.tie_mismatches += 1;
                    continue;
                }
                assert!(diff <= allowed_ulps * ulp_at(a.dtype, magnitude), "{name}: `{tensor}`[{i}] = {} (fusekit) vs {} (mergekit): {d} ulps, operands up to {magnitude}", a.values[i], b.values[i]);
                report.cancellations += 1;
            } else {
                report.max_ulps = report.max_ulps.max(d);
                report.off_by_one += (d == 1) as usize;
            }
        }
    }
    // torch's unstable argsort breaks ties among equal bf16 magnitudes arbitrarily (not by index),
    // so a small share of TIES elements legitimately differ; everything else must agree.
    assert!(
        report.tie_mismatches as f64 <= 0.05 * report.elements as f64
            && report.tie_mismatches <= 2 * report.ties.max(1),
        "{name}: {} of {} elements differ at ties",
        report.tie_mismatches,
        report.elements
    );
    report
}

/// A masked merge (Arcee Fusion) takes each element from the base or the other model (mergekit:
/// base + the task vector rounded to the compute dtype, so within a few ulps of the other
/// model). The two may choose differently only where their roundings put an importance on
/// different sides of the threshold; returns how many elements that is (at most `max_flips` of the
/// tensor). The shares of elements taken from the model must agree as closely.
fn compare_mask(
    name: &str,
    max_flips: f64,
    tensor: &str,
    base: &Loaded,
    other: &Loaded,
    ours: &Loaded,
    theirs: &Loaded,
) -> usize {
    let (mut flips, mut taken) = (0, [0i64; 2]);
    for (i, (x, y)) in ours.values.iter().zip(&theirs.values).enumerate() {
        let (b, o) = (base.values[i], other.values[i]);
        let tolerance = 4.0 * ulp_at(ours.dtype, b.abs().max(o.abs()));
        let source = |v: f32| {
            if (v - b).abs() <= tolerance {
                Some(0)
            } else if (v - o).abs() <= tolerance {
                Some(1)
            } else {
                None
            }
        };
        let (mine, reference) = (source(*x), source(*y));
        assert!(
            mine.is_some() && reference.is_some(),
            "{name}: `{tensor}`[{i}] = {x} (fusekit) vs {y} (mergekit): base {b}, model {o}"
        );
        flips += (mine != reference) as usize;
        taken[0] += (mine == Some(1)) as i64;
        taken[1] += (reference == Some(1)) as i64;
    }
    let n = ours.values.len() as f64;
    assert!(
        flips as f64 <= max_flips * n && (taken[0] - taken[1]).abs() as f64 <= max_flips * n,
        "{name}: `{tensor}`: {flips} of {n} elements on the other side of the threshold; \
         {} (fusekit) vs {} (mergekit) taken from the model",
        taken[0],
        taken[1]
    );
    flips
}

/// DARE draws its masks from different random streams than torch, so compare what the method
/// promises: the fraction of changed elements and the L1 mass of the merged task vector.
fn compare_dare(name: &str, tensor: &str, base: &[f32], ours: &[f32], theirs: &[f32]) {
    let changed =
        |v: &[f32]| v.iter().zip(base).filter(|(x, b)| x != b).count() as f64 / base.len() as f64;
    let l1 = |v: &[f32]| {
        v.iter()
            .zip(base)
            .map(|(x, b)| (x - b).abs() as f64)
            .sum::<f64>()
    };
    let n = base.len() as f64;
    // Binomial standard error of a rate, with room for 5 sigma.
    let tolerance = 5.0 * (0.25 / n).sqrt() + 0.01;
    let (ca, cb) = (changed(ours), changed(theirs));
    assert!(
        (ca - cb).abs() <= tolerance,
        "{name}: `{tensor}` changed fraction {ca:.3} (fusekit) vs {cb:.3} (mergekit)"
    );
    if n >= 1024.0 {
        let (la, lb) = (l1(ours), l1(theirs));
        assert!(
            (la - lb).abs() <= 0.15 * lb.max(1e-12),
            "{name}: `{tensor}` L1 of the merged delta {la:.5} vs {lb:.5}"
        );
    }
}

#[test]
fn fusekit_equals_mergekit() {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/mergekit/cases.json")).unwrap(),
    )
    .unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let r = run_case(case);
        println!("{:<45} {:>3} tensors {:>7} elements: {} 1 ulp apart, {} near-zero cancellations, {} at a TIES tie ({} differ)", r.name, r.tensors, r.elements, r.off_by_one, r.cancellations, r.ties, r.tie_mismatches);
    }
}
