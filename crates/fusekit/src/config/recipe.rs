//! Multi-document configs (mergekit-multi): YAML documents separated by `---`, each a merge with
//! an optional `name`. A later step uses an earlier one's output by naming it as a model. Named
//! steps are written under an intermediate directory and reused when already there; the unnamed
//! step (at most one), or else the last document, is the final output.

use super::{error_at, parse_document, LoadedConfig, MergeConfig};
use crate::error::{Error, Result};
use serde_saphyr::Spanned;
use std::path::{Path, PathBuf};

/// One merge of a recipe.
#[derive(Debug)]
pub struct Step {
    /// `None` for the final, unnamed step.
    pub name: Option<String>,
    pub loaded: LoadedConfig,
    /// Indices (into `Recipe::steps`) of the steps whose outputs this one reads.
    pub needs: Vec<usize>,
}

/// The steps of a config in an order where every step comes after the steps it reads; the last
/// one is the final output.
#[derive(Debug)]
pub struct Recipe {
    pub steps: Vec<Step>,
}

pub fn load(path: &Path) -> Result<Recipe> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, &path.display().to_string())
}

pub fn parse(text: &str, origin: &str) -> Result<Recipe> {
    let configs: Vec<MergeConfig> =
        serde_saphyr::from_multiple(text).map_err(|e| Error::config(format!("{origin}: {e}")))?;
    if configs.is_empty() {
        return Err(Error::config(format!(
            "{origin}: no merge config in the file"
        )));
    }
    let texts = document_texts(text, configs.len());
    let steps = configs
        .into_iter()
        .zip(texts)
        .map(|(config, text)| {
            let name = config.name.as_ref().map(|n| n.value.clone());
            Ok(Step {
                name,
                loaded: parse_document(config, text, origin)?,
                needs: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    order(steps)
}

/// The source text of each document, for the config written beside each output. Falls back to
/// the whole file when the split does not match the parsed documents.
fn document_texts(text: &str, count: usize) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            documents.push(String::new());
        } else {
            let last = documents.last_mut().expect("one document at least");
            last.push_str(line);
            last.push('\n');
        }
    }
    let is_empty = |d: &String| {
        d.lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    };
    documents.retain(|d| !is_empty(d));
    if documents.len() == count {
        documents
    } else {
        vec![text.to_string(); count]
    }
}

/// Checks the names, finds which steps read which and sorts them so dependencies run first.
fn order(mut steps: Vec<Step>) -> Result<Recipe> {
    let names: Vec<Option<String>> = steps.iter().map(|s| s.name.clone()).collect();
    for (i, step) in steps.iter().enumerate() {
        if let Some(name) = &step.loaded.config.name {
            if name.value.is_empty() || name.value.contains(['/', '\\']) || name.value == ".." {
                return Err(error_at(
                    name,
                    "name",
                    "a step name must be a plain, non-empty directory name",
                ));
            }
            if names[..i].contains(&step.name) {
                return Err(error_at(
                    name,
                    "name",
                    format!("`{}` is used twice", name.value),
                ));
            }
        }
    }
    let unnamed = names.iter().filter(|n| n.is_none()).count();
    if unnamed > 1 {
        return Err(Error::config(
            "more than one document without `name`: only the final merge may be unnamed",
        ));
    }
    for step in &mut steps {
        let mut needs: Vec<usize> = step
            .loaded
            .config
            .model_references()
            .filter_map(|r| {
                let path = reference_path(&r.value);
                names.iter().position(|n| n.as_deref() == Some(path))
            })
            .collect();
        needs.sort_unstable();
        needs.dedup();
        step.needs = needs;
    }
    let final_index = names
        .iter()
        .position(Option::is_none)
        .unwrap_or(steps.len() - 1);
    // Depth-first from each step in document order, the final step last.
    let mut order = Vec::with_capacity(steps.len());
    let mut state = vec![Visit::New; steps.len()];
    let roots = (0..steps.len())
        .filter(|&i| i != final_index)
        .chain([final_index]);
    for root in roots {
        visit(root, &steps, &mut state, &mut order)?;
    }
    if order.last() != Some(&final_index) {
        return Err(Error::config(format!(
            "`{}` reads the final merge; only named steps can be inputs",
            steps[*order.last().expect("steps")]
                .name
                .as_deref()
                .unwrap_or("a step")
        )));
    }
    // Renumber `needs` into the new order.
    let position: Vec<usize> = {
        let mut p = vec![0; steps.len()];
        for (new, &old) in order.iter().enumerate() {
            p[old] = new;
        }
        p
    };
    let mut slots: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
    let steps = order
        .iter()
        .map(|&old| {
            let mut step = slots[old].take().expect("each step once");
            step.needs = step.needs.iter().map(|&n| position[n]).collect();
            step.needs.sort_unstable();
            step
        })
        .collect();
    Ok(Recipe { steps })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Visit {
    New,
    Open,
    Done,
}

fn visit(i: usize, steps: &[Step], state: &mut [Visit], order: &mut Vec<usize>) -> Result<()> {
    match state[i] {
        Visit::Done => return Ok(()),
        Visit::Open => {
            return Err(Error::config(format!(
                "the steps read each other in a cycle (through `{}`)",
                steps[i].name.as_deref().unwrap_or("the final merge")
            )))
        }
        Visit::New => {}
    }
    state[i] = Visit::Open;
    for &n in &steps[i].needs {
        visit(n, steps, state, order)?;
    }
    state[i] = Visit::Done;
    order.push(i);
    Ok(())
}

/// The model path of a reference `path[@revision][+lora[@revision]]`.
pub fn reference_path(reference: &str) -> &str {
    let end = reference.find(['@', '+']).unwrap_or(reference.len());
    &reference[..end]
}

impl Recipe {
    /// Where each step writes: named steps under `intermediate`, the final step at `out`.
    pub fn outputs(&self, out: &Path, intermediate: &Path) -> Vec<PathBuf> {
        let last = self.steps.len() - 1;
        self.steps
            .iter()
            .enumerate()
            .map(|(i, step)| match &step.name {
                Some(name) if i != last => intermediate.join(name),
                _ => out.to_path_buf(),
            })
            .collect()
    }

    /// Points every reference to an earlier step at that step's output directory.
    pub fn resolve(&mut self, outputs: &[PathBuf]) {
        let names: Vec<Option<String>> = self.steps.iter().map(|s| s.name.clone()).collect();
        for step in &mut self.steps {
            for reference in step.loaded.config.model_references_mut() {
                let path = reference_path(&reference.value);
                if let Some(i) = names.iter().position(|n| n.as_deref() == Some(path)) {
                    let rest = reference.value[path.len()..].to_string();
                    reference.value = format!("{}{rest}", outputs[i].display());
                }
            }
        }
    }
}

impl MergeConfig {
    /// Every place a model is named: base models, inputs and slice sources (at the top level and
    /// in every module), the tokenizer source.
    pub fn model_references(&self) -> impl Iterator<Item = &Spanned<String>> {
        let parts = std::iter::once((&self.models, &self.slices)).chain(
            self.modules
                .iter()
                .flat_map(|m| m.values().map(|m| (&m.models, &m.slices))),
        );
        let inputs = parts.flat_map(|(models, slices)| {
            let models = models.iter().flatten().map(|m| &m.model);
            let slices = slices.iter().flatten().flat_map(|s| {
                s.sources
                    .iter()
                    .map(|source| &source.model)
                    .chain(s.base_model.iter())
            });
            models.chain(slices)
        });
        let tokenizer = self.tokenizer.iter().flat_map(|t| t.source.iter());
        self.base_model
            .iter()
            .chain(inputs)
            .chain(self.tokenizer_source.iter())
            .chain(tokenizer)
    }

    fn model_references_mut(&mut self) -> impl Iterator<Item = &mut Spanned<String>> {
        let parts = std::iter::once((&mut self.models, &mut self.slices)).chain(
            self.modules
                .iter_mut()
                .flat_map(|m| m.values_mut().map(|m| (&mut m.models, &mut m.slices))),
        );
        let inputs = parts.flat_map(|(models, slices)| {
            let models = models.iter_mut().flatten().map(|m| &mut m.model);
            let slices = slices.iter_mut().flatten().flat_map(|s| {
                s.sources
                    .iter_mut()
                    .map(|source| &mut source.model)
                    .chain(s.base_model.iter_mut())
            });
            models.chain(slices)
        });
        let tokenizer = self.tokenizer.iter_mut().flat_map(|t| t.source.iter_mut());
        self.base_model
            .iter_mut()
            .chain(inputs)
            .chain(self.tokenizer_source.iter_mut())
            .chain(tokenizer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAIN: &str = "\
merge_method: linear
models:
  - model: final_a
    parameters: {weight: 1.0}
  - model: step_b
    parameters: {weight: 1.0}
---
name: final_a
merge_method: slerp
base_model: x
models:
  - model: x
  - model: step_b
parameters: {t: 0.5}
---
# the first step
name: step_b
merge_method: linear
models:
  - model: x
    parameters: {weight: 1.0}
  - model: y
    parameters: {weight: 1.0}
";

    #[test]
    fn steps_run_after_what_they_read() {
        let mut recipe = parse(CHAIN, "c.yml").unwrap();
        let names: Vec<_> = recipe.steps.iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, [Some("step_b".into()), Some("final_a".into()), None]);
        assert_eq!(recipe.steps[1].needs, [0]);
        assert_eq!(recipe.steps[2].needs, [0, 1]);
        assert!(recipe.steps[0].loaded.text.starts_with("# the first step"));
        let outputs = recipe.outputs(Path::new("out"), Path::new("tmp"));
        assert_eq!(outputs[0], Path::new("tmp/step_b"));
        assert_eq!(outputs[2], Path::new("out"));
        recipe.resolve(&outputs);
        let refs: Vec<&str> = recipe.steps[2]
            .loaded
            .config
            .model_references()
            .map(|r| r.value.as_str())
            .collect();
        assert_eq!(refs, ["tmp/final_a", "tmp/step_b"]);
    }

    #[test]
    fn single_documents_still_parse() {
        let recipe = parse("---\nmerge_method: linear\nmodels:\n  - model: a\n", "c").unwrap();
        assert_eq!(recipe.steps.len(), 1);
        assert!(recipe.steps[0].loaded.text.starts_with("merge_method"));
    }

    #[test]
    fn cycles_and_duplicates_are_refused() {
        let cycle = "name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\nname: b\nmerge_method: linear\nmodels: [{model: a}]\n";
        let err = parse(cycle, "c").unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
        let twice = "name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\nname: a\nmerge_method: linear\nmodels: [{model: y}]\n";
        let err = parse(twice, "c").unwrap_err().to_string();
        assert!(
            err.contains("used twice") && err.contains("line 5"),
            "{err}"
        );
        let two_final = "merge_method: linear\nmodels: [{model: x}]\n---\nmerge_method: linear\nmodels: [{model: y}]\n";
        assert!(parse(two_final, "c").is_err());
    }
}
