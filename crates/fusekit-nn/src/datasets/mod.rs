//! Real labelled data turned into the JSONL task files the rest of the runtime reads
//! (`{"text" | "input", "label"}`), with seeded train/test splits. Each source is installed
//! offline from a package registry (`shared/specs/real-data.md`); nothing is downloaded here.

pub mod pickle;
pub mod vision;
pub mod wordnet;

use crate::eval::Example;
use crate::Result;
use std::path::Path;

/// One labelled example.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    pub text: String,
    pub label: u32,
}

impl From<Labelled> for Example {
    fn from(l: Labelled) -> Example {
        Example::Text(l.text, l.label)
    }
}

/// Writes examples as JSONL lines `{"text" | "input", "label"}`.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    let text: String = examples
        .iter()
        .map(|e| {
            let line = match e {
                Example::Text(text, label) => serde_json::json!({"text": text, "label": label}),
                Example::Vector(input, label) => {
                    serde_json::json!({"input": input, "label": label})
                }
            };
            line.to_string() + "\n"
        })
        .collect();
    std::fs::write(path, text).map_err(|e| fusekit::Error::io(path, e))?;
    Ok(())
}

/// Writes `train` and `test` examples of a task to `dir/NAME.train.jsonl` and `.test.jsonl`.
pub fn write_split(dir: &Path, name: &str, train: &[Labelled], test: &[Labelled]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| fusekit::Error::io(dir, e))?;
    for (part, examples) in [("train", train), ("test", test)] {
        let path = dir.join(format!("{name}.{part}.jsonl"));
        let text: String = examples
            .iter()
            .map(|e| serde_json::json!({"text": e.text, "label": e.label}).to_string() + "\n")
            .collect();
        std::fs::write(&path, text).map_err(|e| fusekit::Error::io(&path, e))?;
    }
    Ok(())
}

/// `examples` in a seeded order (Fisher–Yates on the counter-based stream), cut into the first
/// `train` and the next `test`.
pub fn split(
    examples: Vec<Labelled>,
    train: usize,
    test: usize,
    seed: u64,
) -> (Vec<Labelled>, Vec<Labelled>) {
    let mut slots: Vec<Option<Labelled>> = examples.into_iter().map(Some).collect();
    let mut examples: Vec<Labelled> = fusekit::rng::permutation(seed, "split", slots.len())
        .into_iter()
        .map(|i| slots[i].take().expect("a permutation takes each once"))
        .collect();
    let test_part = examples.split_off(train.min(examples.len()));
    (examples, test_part.into_iter().take(test).collect())
}
