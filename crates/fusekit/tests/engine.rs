//! End-to-end behaviour of the engine: output layout, reproducibility, memory-budget paths,
//! sharding, the Hugging Face cache, and refusal of bad input without leaving anything behind.

mod common;

use common::*;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{write_model, Family, ModelSpec};
use fusekit::MergeOptions;
use std::path::Path;

const TIES: &str = "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {density: 0.3, weight: 1.0}\n  - model: ./ft2\n    parameters: {density: 0.6, weight: 0.5}\n";
const DARE: &str = "merge_method: dare_ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {density: 0.3, weight: 1.0}\n  - model: ./ft2\n    parameters: {density: 0.6, weight: 0.5}\n";

fn three_models(dir: &Path, family: Family, dtype: Dtype) {
    three_models_of(dir, ModelSpec::tiny(family, dtype, 1));
}

/// `base`, and fine-tunes `ft1` and `ft2` of it, from one model shape.
fn three_models_of(dir: &Path, base: ModelSpec) {
    write_model(&base, &dir.join("base")).unwrap();
    write_model(&base.clone().finetuned(2, 0.01), &dir.join("ft1")).unwrap();
    write_model(&base.finetuned(3, 0.01), &dir.join("ft2")).unwrap();
}

fn shard_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(p).unwrap(),
            )
        })
        .collect()
}

fn options(threads: usize, budget: usize, shard: usize, seed: u64) -> MergeOptions {
    let mut o = MergeOptions::default();
    o.exec.threads = threads;
    o.exec.memory_budget = budget;
    o.plan.max_shard_size = shard;
    o.plan.seed = seed;
    o
}

#[test]
fn same_bytes_whatever_threads_budget_and_path() {
    let dir = tempfile::tempdir().unwrap();
    three_models(dir.path(), Family::Llama, Dtype::BF16);
    for (config, tag) in [(TIES, "ties"), (DARE, "dare")] {
        let reference = {
            merge_yaml(
                dir.path(),
                config,
                &format!("{tag}_ref"),
                &options(1, 1 << 30, usize::MAX, 5),
            )
            .unwrap();
            shard_bytes(&dir.path().join(format!("{tag}_ref")))
        };
        // 2–3 threads, with budgets from 1 GiB down to 1 byte (one block per output chunk).
        for (i, (threads, budget)) in [(2, 1 << 30), (2, 1), (3, 300_000)].into_iter().enumerate() {
            let out = format!("{tag}_{i}");
            merge_yaml(
                dir.path(),
                config,
                &out,
                &options(threads, budget, usize::MAX, 5),
            )
            .unwrap();
            assert_eq!(
                shard_bytes(&dir.path().join(&out)),
                reference,
                "{tag} with {threads} threads, budget {budget}"
            );
        }
    }
    // Another seed gives other DARE masks.
    merge_yaml(
        dir.path(),
        DARE,
        "dare_seed6",
        &options(1, 1 << 30, usize::MAX, 6),
    )
    .unwrap();
    assert_ne!(
        shard_bytes(&dir.path().join("dare_seed6")),
        shard_bytes(&dir.path().join("dare_ref"))
    );
}

#[test]
fn sampled_window_ties_is_independent_of_budget() {
    // Tensors of 32+ blocks take the sampled-window top-k; a large budget computes each tensor's
    // output in one chunk, a tiny one in many: the bytes must agree.
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ModelSpec::tiny(Family::Llama, Dtype::BF16, 1);
    (spec.hidden, spec.intermediate, spec.vocab, spec.layers) = (256, 512, 600, 2);
    three_models_of(dir.path(), spec);
    merge_yaml(
        dir.path(),
        TIES,
        "large_budget",
        &options(2, 1 << 30, usize::MAX, 0),
    )
    .unwrap();
    merge_yaml(
        dir.path(),
        TIES,
        "tiny_budget",
        &options(2, 1 << 16, usize::MAX, 0),
    )
    .unwrap();
    assert_eq!(
        shard_bytes(&dir.path().join("large_budget")),
        shard_bytes(&dir.path().join("tiny_budget"))
    );
}

#[test]
fn shards_in_and_out_with_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ModelSpec::tiny(Family::Llama, Dtype::BF16, 1);
    spec.max_shard_bytes = 20_000;
    three_models_of(dir.path(), spec);
    assert!(dir
        .path()
        .join("base/model.safetensors.index.json")
        .exists());
    merge_yaml(dir.path(), TIES, "sharded", &options(0, 1 << 30, 16_000, 0)).unwrap();
    let out = dir.path().join("sharded");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards = shard_bytes(&out);
    assert!(
        shards.len() > 3
            && shards[0].0 == format!("model-00001-of-{:05}.safetensors", shards.len())
    );
    let total: usize = load_model(&out).values().map(|t| t.values.len() * 2).sum();
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap() as usize,
        total
    );
    // The same merge unsharded holds the same tensors.
    merge_yaml(
        dir.path(),
        TIES,
        "single",
        &options(0, 1 << 30, usize::MAX, 0),
    )
    .unwrap();
    let (a, b) = (load_model(&out), load_model(&dir.path().join("single")));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(t.bits, b[name].bits, "{name}");
    }
}

#[test]
fn output_directory_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    three_models(dir.path(), Family::Bert, Dtype::F32);
    let config = "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: 1.0}\nout_dtype: bfloat16\nchat_template: chatml\n";
    merge_yaml(
        dir.path(),
        config,
        "out",
        &options(0, 1 << 30, usize::MAX, 0),
    )
    .unwrap();
    let out = dir.path().join("out");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
        "chat_template.jinja",
        "mergekit_config.yml",
        "README.md",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\n")
            && card.contains("task_arithmetic")
            && card.contains("merge_method: task_arithmetic")
    );
    let tensors = load_model(&out);
    // Integer tensors are copied from the base unchanged.
    let ids = &tensors["embeddings.position_ids"];
    assert_eq!(ids.dtype, Dtype::I64);
    assert_eq!(
        ids.bits,
        load_model(&dir.path().join("base"))["embeddings.position_ids"].bits
    );
    assert_eq!(tensors["pooler.dense.weight"].dtype, Dtype::BF16);
    // Nothing else is left beside OUT.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn tokenizer_source_and_progress() {
    let dir = tempfile::tempdir().unwrap();
    three_models(dir.path(), Family::Llama, Dtype::BF16);
    let config = format!("{TIES}tokenizer_source: ./ft2\n");
    struct Count(std::sync::atomic::AtomicU64);
    impl fusekit::exec::Progress for Count {
        fn advance(&self, bytes: u64) {
            self.0
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let text = config.replace("./", &format!("{}/", dir.path().display()));
    let loaded = fusekit::config::parse(&text, "inline").unwrap();
    let plan = fusekit::plan::build(&loaded, &Default::default()).unwrap();
    let count = Count(Default::default());
    let out = dir.path().join("out");
    fusekit::write::write(
        &plan,
        &out,
        &Default::default(),
        &Default::default(),
        &count,
    )
    .unwrap();
    assert_eq!(
        count.0.into_inner() as usize,
        plan.total_bytes(),
        "progress sums to the output size"
    );
    let tokenizer = std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap();
    let donor = std::fs::read_to_string(dir.path().join("ft2/tokenizer_config.json")).unwrap();
    assert_eq!(tokenizer, donor);
    assert_ne!(
        tokenizer,
        std::fs::read_to_string(dir.path().join("base/tokenizer_config.json")).unwrap()
    );
    // The union of equal vocabularies is that vocabulary: nothing moves.
    merge_yaml(
        dir.path(),
        &format!("{TIES}tokenizer_source: union\n"),
        "u",
        &Default::default(),
    )
    .unwrap();
    let union = load_model(&dir.path().join("u"));
    let plain = load_model(&out);
    assert_eq!(
        union["model.embed_tokens.weight"].bits,
        plain["model.embed_tokens.weight"].bits
    );
    let config = std::fs::read_to_string(dir.path().join("u/config.json")).unwrap();
    assert!(config.contains("\"vocab_size\": 64"), "{config}");
}

#[test]
fn passthrough_renumbers_layers_and_updates_config() {
    let dir = tempfile::tempdir().unwrap();
    make(&dir.path().join("a"), Family::Llama, Dtype::BF16, 1, None);
    make(&dir.path().join("b"), Family::Llama, Dtype::BF16, 2, None);
    let config = "merge_method: passthrough\nslices:\n  - sources: [{model: ./a, layer_range: [0, 3]}]\n  - sources: [{model: ./b, layer_range: [1, 4]}]\n";
    merge_yaml(
        dir.path(),
        config,
        "stack",
        &options(0, 1 << 30, usize::MAX, 0),
    )
    .unwrap();
    let out = load_model(&dir.path().join("stack"));
    let (a, b) = (
        load_model(&dir.path().join("a")),
        load_model(&dir.path().join("b")),
    );
    assert_eq!(
        out["model.layers.2.mlp.up_proj.weight"].bits,
        a["model.layers.2.mlp.up_proj.weight"].bits
    );
    assert_eq!(
        out["model.layers.3.mlp.up_proj.weight"].bits,
        b["model.layers.1.mlp.up_proj.weight"].bits
    );
    assert_eq!(
        out["model.layers.5.mlp.up_proj.weight"].bits,
        b["model.layers.3.mlp.up_proj.weight"].bits
    );
    assert!(!out.contains_key("model.layers.6.mlp.up_proj.weight"));
    assert_eq!(
        out["lm_head.weight"].bits, b["lm_head.weight"].bits,
        "post weights come from the last slice"
    );
    assert_eq!(
        out["model.embed_tokens.weight"].bits, a["model.embed_tokens.weight"].bits,
        "pre weights from the first"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("stack/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["num_hidden_layers"], 6);
}

#[test]
fn resolves_models_from_the_hub_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let snapshot = cache.join("models--org--tiny/snapshots/0123abcd");
    make(&snapshot, Family::Qwen2, Dtype::BF16, 1, None);
    std::fs::create_dir_all(cache.join("models--org--tiny/refs")).unwrap();
    std::fs::write(cache.join("models--org--tiny/refs/main"), "0123abcd").unwrap();
    make(
        &dir.path().join("local"),
        Family::Qwen2,
        Dtype::BF16,
        2,
        None,
    );
    // SAFETY: the only test in this binary that reads HF_HUB_CACHE.
    unsafe { std::env::set_var("HF_HUB_CACHE", &cache) };
    let config = "merge_method: linear\nmodels:\n  - model: org/tiny\n    parameters: {weight: 1}\n  - model: org/tiny@0123abcd\n    parameters: {weight: 1}\n  - model: ./local\n    parameters: {weight: 2}\n";
    let plan = merge_yaml(
        dir.path(),
        config,
        "out",
        &options(0, 1 << 30, usize::MAX, 0),
    )
    .unwrap();
    assert_eq!(plan.models.len(), 3);
    let card = std::fs::read_to_string(dir.path().join("out/README.md")).unwrap();
    assert!(card.contains("base_model:\n- org/tiny\n"), "{card}");
    let err = merge_yaml(
        dir.path(),
        "merge_method: linear\nmodels:\n  - model: org/absent\n    parameters: {weight: 1}\n",
        "x",
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("org/absent") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn bad_input_is_refused_with_a_precise_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    three_models(d, Family::Llama, Dtype::BF16);
    make(&d.join("other"), Family::Mistral, Dtype::BF16, 1, None);
    let mut wide = ModelSpec::tiny(Family::Llama, Dtype::BF16, 1);
    wide.intermediate = 48;
    write_model(&wide, &d.join("wide")).unwrap();
    make(&d.join("f64"), Family::Llama, Dtype::BF16, 1, None);

    refused(
        d,
        "merge_method: ties\nmodels:\n  - model: ./ft1\n    parameters: {weight: 1}\n",
        &["ties", "base_model"],
    );
    refused(
        d,
        "merge_method: tiez\nbase_model: ./base\nmodels:\n  - model: ./ft1\n",
        &["merge_method", "tiez", "line 1"],
    );
    refused(d, "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weigth: 1}\n", &["weigth", "line 5"]);
    refused(d, "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n    parameters: {weight: yes please}\n", &["weight", "line 5", "not a finite number"]);
    refused(
        d,
        "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./ft1\n",
        &["ft1", "weight"],
    );
    refused(
        d,
        "merge_method: linear\nmodels:\n  - model: ./missing\n    parameters: {weight: 1}\n",
        &["missing", "line 3"],
    );
    refused(d, "merge_method: slerp\nbase_model: ./base\nmodels:\n  - model: ./ft1\n  - model: ./ft2\nparameters: {t: 0.5}\n", &["slerp", "exactly 2"]);
    refused(d, "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: {weight: 1}\n  - model: ./wide\n    parameters: {weight: 1}\n", &["mlp", "shape", "wide"]);
    refused(d, "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: {weight: 1}\n  - model: ./ft1\n    parameters: {weight: -1}\n", &["sum to zero"]);
    refused(d, "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: {weight: 1}\ndtype: float64\n", &["dtype", "float64", "line 5"]);

    // Tokenizer settings.
    let lin = "merge_method: linear\nbase_model: ./base\nmodels:\n  - model: ./base\n    parameters: {weight: 1}\n  - model: ./ft1\n    parameters: {weight: 1}\n";
    refused(
        d,
        &format!("{lin}tokenizer_source: union\ntokenizer: {{source: base}}\n"),
        &["tokenizer_source", "not both", "line 8"],
    );
    refused(d, &format!("{lin}tokenizer:\n  tokens:\n    t5:\n      source: {{kind: model_token, model: ./ft1}}\n"), &["tokenizer.tokens.t5", "token_id", "line 11"]);
    refused(
        d,
        &format!("{lin}tokenizer:\n  tokens:\n    t5:\n      source: ./ft2\n      force: true\n"),
        &["model.embed_tokens.weight", "not an input"],
    );
    refused(d, &format!("{lin}tokenizer:\n  tokens:\n    t5:\n      source: {{kind: model_token, model: ./ft1, token: nope}}\n"), &["nope", "ft1"]);
    std::fs::remove_file(d.join("base/tokenizer.json")).unwrap();
    refused(
        d,
        &format!("{lin}tokenizer_source: union\n"),
        &["base", "tokenizer.json", "union"],
    );

    // A tensor missing from one model.
    let mut no_head = ModelSpec::tiny(Family::Qwen2, Dtype::BF16, 1);
    no_head.layers = 4;
    write_model(&no_head, &d.join("qwen")).unwrap();
    refused(d, "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: {weight: 1}\n  - model: ./qwen\n    parameters: {weight: 1}\n", &["missing from model", "qwen"]);

    // A truncated shard and a corrupt header.
    let cut = d.join("cut");
    make(&cut, Family::Llama, Dtype::BF16, 1, None);
    let file = cut.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    refused(
        d,
        "merge_method: linear\nmodels:\n  - model: ./cut\n    parameters: {weight: 1}\n",
        &["truncated", "model.safetensors"],
    );
    let garbled = d.join("garbled");
    make(&garbled, Family::Llama, Dtype::BF16, 1, None);
    let mut bytes = std::fs::read(garbled.join("model.safetensors")).unwrap();
    bytes[10] = b'#';
    std::fs::write(garbled.join("model.safetensors"), bytes).unwrap();
    refused(
        d,
        "merge_method: linear\nmodels:\n  - model: ./garbled\n    parameters: {weight: 1}\n",
        &["invalid header", "garbled"],
    );

    // Unsupported float dtype in one input.
    let bad_dtype = d.join("f64");
    let file = bad_dtype.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let patched = header.replacen(
        "\"dtype\":\"BF16\",\"shape\":[64,32]",
        "\"dtype\":\"I16\" ,\"shape\":[64,32]",
        1,
    );
    assert_ne!(header, patched);
    bytes[8..8 + n].copy_from_slice(patched.as_bytes());
    std::fs::write(&file, bytes).unwrap();
    refused(d, "merge_method: linear\nmodels:\n  - model: ./base\n    parameters: {weight: 1}\n  - model: ./f64\n    parameters: {weight: 1}\n", &["unsupported dtype", "I16", "f64"]);
}

#[test]
fn output_never_touches_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    three_models(d, Family::Llama, Dtype::BF16);
    let before = shard_bytes(&d.join("base"));
    let config = d.join("c.yml");
    std::fs::write(&config, TIES.replace("./", &format!("{}/", d.display()))).unwrap();
    for out in [d.join("base"), d.join("base/sub"), d.to_path_buf()] {
        let o = fusekit::MergeOptions {
            write: fusekit::write::WriteOptions { force: true },
            ..Default::default()
        };
        let err = fusekit::merge(&config, &out, &o, &())
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlaps input model"), "{err}");
    }
    assert_eq!(shard_bytes(&d.join("base")), before);
    fusekit::merge(&config, &d.join("out"), &Default::default(), &()).unwrap();
    let err = fusekit::merge(&config, &d.join("out"), &Default::default(), &())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let o = fusekit::MergeOptions {
        write: fusekit::write::WriteOptions { force: true },
        ..Default::default()
    };
    fusekit::merge(&config, &d.join("out"), &o, &()).unwrap();
}
