//! The same config and seed give the same bytes whatever the thread count, the memory budget
//! or the run, for every method, the random ones (DARE, DELLA) included.

mod common;

use common::checksums;
use fusekit::dtype::Dtype;
use fusekit::fixtures::{method_config, write_model, Family, ModelSpec};
use fusekit::MergeOptions;

#[test]
fn every_method_gives_the_same_bytes_with_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Tensors of several blocks, so threads and budgets really split them differently.
    let mut base = ModelSpec::tiny(Family::Llama, Dtype::BF16, 1);
    (base.hidden, base.intermediate, base.vocab, base.layers) = (128, 320, 1024, 2);
    write_model(&base, &d.join("base")).unwrap();
    write_model(&base.clone().finetuned(2, 0.02), &d.join("ft1")).unwrap();
    write_model(&base.finetuned(3, 0.02), &d.join("ft2")).unwrap();
    for ft in ["ft1", "ft2"] {
        fusekit::fixtures::write_fisher_stand_in(&d.join(ft), &d.join(format!("{ft}.fisher")))
            .unwrap();
    }
    let inputs = || ["base", "ft1", "ft2"].map(|m| checksums(&d.join(m)));
    let before = inputs();
    for method in fusekit::methods::all() {
        let name = method.spec().name;
        let config = d.join(format!("{name}.yml"));
        std::fs::write(&config, method_config(name, d)).unwrap();
        let mut outputs = Vec::new();
        for (threads, budget) in [(1, 1 << 30), (2, 1 << 20), (8, 1 << 18), (8, 1 << 30)] {
            let out = d.join(format!("{name}-{threads}-{budget}"));
            let mut options = MergeOptions::default();
            options.exec.threads = threads;
            options.exec.memory_budget = budget;
            options.plan.seed = 7;
            fusekit::merge(&config, &out, &options, &()).unwrap_or_else(|e| panic!("{name}: {e}"));
            let sums: Vec<u64> = checksums(&out).into_values().collect();
            outputs.push(sums);
            std::fs::remove_dir_all(&out).unwrap();
        }
        assert!(
            outputs.windows(2).all(|w| w[0] == w[1]),
            "{name}: the output depends on threads or budget"
        );
    }
    assert_eq!(before, inputs());
}
