//! Every merge method fusekit has, with the settings the quality benchmark tries. Methods with
//! a scale of the merged task vector try each of [`SCALES`] and keep the one with the best mean
//! validation accuracy; the test split is only ever seen by the chosen merge.

/// The scales tried (λ of task arithmetic, TIES, DARE, DELLA, breadcrumbs, PCB; α of TSV;
/// the scale of ISO-C).
pub const SCALES: [f64; 9] = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    DataFree,
    DataAware,
}

/// How a method is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// One `fusekit merge` of a YAML config.
    Config,
    /// `fusekit continual`: the experts folded in one at a time (OPCM).
    Continual,
    /// Not applicable to merging several experts, with the reason.
    NotApplicable(&'static str),
}

pub struct Entry {
    pub method: &'static str,
    pub family: Family,
    pub runner: Runner,
    /// Each expert's `parameters:`.
    pub per_model: &'static str,
    /// Fixed global `parameters:`.
    pub global: &'static str,
    /// The global parameter that scales the merged task vector, tried over [`SCALES`].
    pub scale: Option<&'static str>,
    pub uses_base: bool,
}

const fn entry(
    method: &'static str,
    per_model: &'static str,
    scale: Option<&'static str>,
) -> Entry {
    Entry {
        method,
        family: Family::DataFree,
        runner: Runner::Config,
        per_model,
        global: "",
        scale,
        uses_base: true,
    }
}

const TWO_MODELS: &str = "merges the base with one other model";

pub fn roster() -> Vec<Entry> {
    let lambda = Some("lambda");
    let data_aware = |method| Entry {
        family: Family::DataAware,
        ..entry(method, "", None)
    };
    let not_applicable = |method, why| Entry {
        runner: Runner::NotApplicable(why),
        ..entry(method, "", None)
    };
    vec![
        Entry {
            uses_base: false,
            ..entry("linear", "weight: 1.0", None)
        },
        entry("task_arithmetic", "weight: 1.0", lambda),
        entry("ties", "weight: 1.0, density: 0.2", lambda),
        entry("dare_ties", "weight: 1.0, density: 0.5", lambda),
        entry("dare_linear", "weight: 1.0, density: 0.5", lambda),
        entry("della", "weight: 1.0, density: 0.5", lambda),
        entry("della_linear", "weight: 1.0, density: 0.5", lambda),
        entry(
            "breadcrumbs",
            "weight: 1.0, density: 0.9, gamma: 0.01",
            lambda,
        ),
        entry(
            "breadcrumbs_ties",
            "weight: 1.0, density: 0.9, gamma: 0.01",
            lambda,
        ),
        entry("ram", "", None),
        entry("ramplus_tl", "", None),
        entry("sce", "", None),
        entry("multislerp", "weight: 1.0", None),
        Entry {
            uses_base: false,
            ..entry("karcher", "", None)
        },
        entry("model_stock", "", None),
        entry("varm", "", None),
        entry("widen", "", None),
        entry("tsv", "", Some("alpha")),
        entry("iso_c", "", Some("scale")),
        entry("pcb", "", lambda),
        entry("pcb_per_tensor", "", lambda),
        Entry {
            runner: Runner::Continual,
            ..entry("opcm", "", None)
        },
        Entry {
            uses_base: false,
            ..data_aware("fisher")
        },
        Entry {
            uses_base: false,
            ..data_aware("regmean")
        },
        data_aware("adamerging"),
        data_aware("atlas"),
        data_aware("expert_merging"),
        not_applicable("slerp", TWO_MODELS),
        not_applicable("nuslerp", "interpolates two models"),
        not_applicable("nearswap", TWO_MODELS),
        not_applicable("arcee_fusion", TWO_MODELS),
        not_applicable("passthrough", "copies tensors of one model"),
    ]
}

/// One setting of a method: a label (`lambda=0.5`, or empty) and its YAML config.
pub struct Setting {
    pub label: String,
    pub yaml: String,
}

/// What a suite sets for a data-aware method: global `parameters` and extra fields of each
/// `data:` entry (e.g. the Fisher's `kind`).
#[derive(Clone, Copy, Default)]
pub struct DataAwareSettings {
    pub parameters: &'static str,
    pub data: &'static str,
}

/// The configs to try for `entry`, merging `experts` (with `base`); `calibration[i]` is
/// expert i's data file and `learned` the suite's own settings for this method.
pub fn settings(
    entry: &Entry,
    base: &str,
    experts: &[String],
    calibration: &[String],
    learned: DataAwareSettings,
) -> Vec<Setting> {
    let mut head = format!("merge_method: {}\n", entry.method);
    if entry.uses_base {
        head += &format!("base_model: {base}\n");
    }
    head += "models:\n";
    for expert in experts {
        head += &format!("  - model: {expert}\n");
        if !entry.per_model.is_empty() {
            head += &format!("    parameters: {{{}}}\n", entry.per_model);
        }
    }
    if entry.family == Family::DataAware {
        head += "data:\n";
        let extra = if learned.data.is_empty() {
            String::new()
        } else {
            format!(", {}", learned.data)
        };
        for (expert, file) in experts.iter().zip(calibration) {
            head += &format!("  {expert}: {{file: {file}{extra}}}\n");
        }
    }
    let global = |extra: Option<String>| {
        let mut parts: Vec<String> = [entry.global.to_string(), extra.unwrap_or_default()]
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        if !learned.parameters.is_empty() {
            parts.push(learned.parameters.to_string());
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("parameters: {{{}}}\n", parts.join(", "))
        }
    };
    match entry.scale {
        None => vec![Setting {
            label: String::new(),
            yaml: format!("{head}{}dtype: float32\n", global(None)),
        }],
        Some(key) => SCALES
            .iter()
            .map(|s| Setting {
                label: format!("{key}={s}"),
                yaml: format!(
                    "{head}{}dtype: float32\n",
                    global(Some(format!("{key}: {s}")))
                ),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_in_the_roster() {
        let names: Vec<&str> = roster().iter().map(|e| e.method).collect();
        for m in fusekit::methods::all() {
            assert!(names.contains(&m.spec().name), "{} missing", m.spec().name);
        }
        for m in fusekit::methods::LEARNED {
            assert!(names.contains(m), "{m} missing");
        }
    }

    #[test]
    fn scaled_methods_get_one_config_per_scale() {
        let roster = roster();
        let ties = roster.iter().find(|e| e.method == "ties").unwrap();
        let experts = ["a".to_string(), "b".to_string()];
        let tried = settings(ties, "base", &experts, &[], Default::default());
        assert_eq!(tried.len(), SCALES.len());
        for (setting, scale) in tried.iter().zip(SCALES) {
            assert!(setting
                .yaml
                .contains(&format!("parameters: {{lambda: {scale}}}")));
            assert!(setting.yaml.contains("base_model: base"));
        }
        let fisher = roster.iter().find(|e| e.method == "fisher").unwrap();
        let files = ["a.jsonl".to_string(), "b.jsonl".to_string()];
        let sampled = DataAwareSettings {
            parameters: "",
            data: "kind: sampled",
        };
        let yaml = &settings(fisher, "base", &experts, &files, sampled)[0].yaml;
        assert!(
            yaml.contains("  b: {file: b.jsonl, kind: sampled}") && !yaml.contains("base_model"),
            "{yaml}"
        );
        let ada = roster.iter().find(|e| e.method == "adamerging").unwrap();
        let steps = DataAwareSettings {
            parameters: "steps: 3",
            data: "",
        };
        let yaml = &settings(ada, "base", &experts, &files, steps)[0].yaml;
        assert!(yaml.contains("parameters: {steps: 3}"), "{yaml}");
    }
}
