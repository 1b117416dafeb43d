//! The benchmark's results: one row per model (the base, each expert, each method's chosen
//! merge), accuracy per task on the test split, the mean, and the mean normalized by each
//! expert's accuracy on its own task; written as Markdown tables and JSON.

use super::mean;
use super::roster::Family;
use super::suites::Suite;
use anyhow::Result;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Base,
    Expert,
    DataFree,
    DataAware,
}

impl From<Family> for Kind {
    fn from(f: Family) -> Kind {
        match f {
            Family::DataFree => Kind::DataFree,
            Family::DataAware => Kind::DataAware,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub name: String,
    pub kind: Kind,
    /// The setting chosen on validation (`lambda=0.5`), empty when there was one.
    pub chosen: String,
    /// Every setting tried, with its mean validation accuracy.
    pub tried: Vec<(String, f64)>,
    pub validation: Option<f64>,
    /// Test accuracy per task (empty when the method did not run).
    pub test: Vec<f64>,
    pub mean: f64,
    /// Why there are no numbers: not applicable, or the error.
    pub note: Option<String>,
    pub seconds: f64,
    pub merge_seconds: f64,
    pub eval_seconds: f64,
}

impl Row {
    fn empty(name: &str, kind: Kind) -> Row {
        Row {
            name: name.to_string(),
            kind,
            chosen: String::new(),
            tried: Vec::new(),
            validation: None,
            test: Vec::new(),
            mean: f64::NAN,
            note: None,
            seconds: 0.0,
            merge_seconds: 0.0,
            eval_seconds: 0.0,
        }
    }

    pub fn reference(name: &str, test: Vec<f64>, started: Instant) -> Row {
        let kind = if name.starts_with("expert") {
            Kind::Expert
        } else {
            Kind::Base
        };
        Row {
            mean: mean(&test),
            test,
            eval_seconds: started.elapsed().as_secs_f64(),
            seconds: started.elapsed().as_secs_f64(),
            ..Row::empty(name, kind)
        }
    }

    pub fn method(
        name: &str,
        family: Family,
        chosen: &str,
        tried: Vec<(String, f64)>,
        validation: f64,
        test: Vec<f64>,
    ) -> Row {
        Row {
            chosen: chosen.to_string(),
            tried,
            validation: Some(validation),
            mean: mean(&test),
            test,
            ..Row::empty(name, family.into())
        }
    }

    pub fn timed(mut self, started: Instant, merge: f64, eval: f64) -> Row {
        self.seconds = started.elapsed().as_secs_f64();
        self.merge_seconds = merge;
        self.eval_seconds = eval;
        self
    }

    pub fn not_applicable(name: &str, family: Family, why: &str) -> Row {
        Row {
            note: Some(format!("not applicable: {why}")),
            ..Row::empty(name, family.into())
        }
    }

    pub fn failed(name: &str, family: Family, error: &str) -> Row {
        Row {
            note: Some(format!("failed: {error}")),
            ..Row::empty(name, family.into())
        }
    }

    fn has_numbers(&self) -> bool {
        !self.test.is_empty()
    }
}

pub struct SuiteReport {
    pub name: String,
    pub tasks: Vec<String>,
    pub rows: Vec<Row>,
    pub training_seconds: f64,
    pub settings: serde_json::Value,
}

impl SuiteReport {
    pub fn new(suite: &Suite) -> SuiteReport {
        SuiteReport {
            name: suite.name.to_string(),
            tasks: suite.tasks.iter().map(|t| t.name.clone()).collect(),
            rows: Vec::new(),
            training_seconds: suite.training_seconds,
            settings: serde_json::json!({
                "base": suite.base.display().to_string(),
                "experts": suite.experts.iter().map(|e| e.display().to_string()).collect::<Vec<_>>(),
                "expert_training": suite.recipe,
                "calibration_examples_per_task": suite.calibration,
                "data_aware_settings": suite.learned_parameters.iter().map(|(m, p)| (m.to_string(), serde_json::json!({"parameters": p.parameters, "data": p.data}))).collect::<std::collections::BTreeMap<_, _>>(),
                "examples": suite.tasks.iter().map(|t| serde_json::json!({
                    "task": t.name, "train": t.train.len(), "validation": t.validation.len(), "test": t.test.len(),
                })).collect::<Vec<_>>(),
            }),
        }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// Each expert's test accuracy on its own task.
    fn own(&self) -> Vec<f64> {
        self.rows
            .iter()
            .filter(|r| r.kind == Kind::Expert)
            .enumerate()
            .map(|(i, r)| r.test.get(i).copied().unwrap_or(f64::NAN))
            .collect()
    }

    /// A row's mean of accuracy over the expert's own, per task.
    pub fn normalized(&self, row: &Row) -> f64 {
        let own = self.own();
        let ratios: Vec<f64> = row
            .test
            .iter()
            .zip(&own)
            .map(|(a, o)| if *o > 0.0 { a / o } else { f64::NAN })
            .collect();
        if ratios.is_empty() {
            f64::NAN
        } else {
            mean(&ratios)
        }
    }

    /// The share of the experts' fine-tuning gain a row keeps: Σₜ(accₜ − baseₜ) over
    /// Σₜ(ownₜ − baseₜ), where the base is evaluated with each task's head. It reads 0 for the
    /// base and 1 for a model as good as every expert; unlike `normalized`, it does not credit a
    /// merge with what the base already did. NaN when the experts gained nothing.
    pub fn gain_kept(&self, row: &Row) -> f64 {
        let Some(base) = self.rows.iter().find(|r| r.kind == Kind::Base) else {
            return f64::NAN;
        };
        let gained: f64 = self.own().iter().zip(&base.test).map(|(o, b)| o - b).sum();
        let kept: f64 = row.test.iter().zip(&base.test).map(|(a, b)| a - b).sum();
        if gained > 0.0 && !row.test.is_empty() {
            kept / gained
        } else {
            f64::NAN
        }
    }

    /// The row of `kind` with the best mean.
    pub fn best(&self, kind: Kind) -> Option<&Row> {
        self.rows
            .iter()
            .filter(|r| r.kind == kind && r.has_numbers())
            .max_by(|a, b| a.mean.total_cmp(&b.mean))
    }

    pub fn table(&self) -> String {
        let mut out = format!("### {} suite\n\n| model | setting |", self.name);
        for task in &self.tasks {
            out += &format!(" {task} |");
        }
        out += " mean | normalized | gain kept |\n|---|---|";
        out += &"---|".repeat(self.tasks.len() + 3);
        out += "\n";
        for row in &self.rows {
            let kind = match row.kind {
                Kind::DataAware => " (data)",
                _ => "",
            };
            out += &format!("| {}{kind} | {} |", row.name, row.chosen);
            if let Some(note) = &row.note {
                let note = note.lines().next().unwrap_or("").replace('|', "/");
                out += &format!(" {note} |{}\n", " |".repeat(self.tasks.len() + 2));
                continue;
            }
            for a in &row.test {
                out += &format!(" {a:.3} |");
            }
            out += &format!(
                " **{:.3}** | {:.1} % | {:.0} % |\n",
                row.mean,
                100.0 * self.normalized(row),
                100.0 * self.gain_kept(row)
            );
        }
        out += "\n";
        out += &self.summary();
        out
    }

    /// The lines that answer the benchmark's question, with the targets.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        if let Some(best) = self.best(Kind::Expert) {
            out += &format!(
                "- best single expert on all tasks: {} (mean {:.3}, {:.1} % normalized)\n",
                best.name,
                best.mean,
                100.0 * self.normalized(best)
            );
        }
        for (kind, what, target) in [
            (Kind::DataFree, "data-free", 96.0),
            (Kind::DataAware, "data-aware", 99.0),
        ] {
            if let Some(best) = self.best(kind) {
                let normalized = 100.0 * self.normalized(best);
                let kept = 100.0 * self.gain_kept(best);
                let verdict = if normalized >= target {
                    "target met".to_string()
                } else {
                    format!("{:.1} points short", target - normalized)
                };
                out += &format!(
                    "- best {what} method: {} {} (mean {:.3}, {normalized:.1} % normalized, {kept:.0} % of the experts' gain kept; target ≥ {target} %: {verdict})\n",
                    best.name, best.chosen, best.mean
                );
            }
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).expect("plain values");
                v["normalized"] = serde_json::json!(finite(self.normalized(r)));
                v["gain_kept"] = serde_json::json!(finite(self.gain_kept(r)));
                v["mean"] = serde_json::json!(finite(r.mean));
                v
            })
            .collect();
        serde_json::json!({
            "suite": self.name,
            "tasks": self.tasks,
            "training_seconds": self.training_seconds,
            "settings": self.settings,
            "rows": rows,
            "summary": self.summary(),
        })
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// `quality.md` and `quality.json` in `dir`.
pub fn write(dir: &Path, reports: &[SuiteReport], seed: u64, small: bool) -> Result<()> {
    let mut md = String::from("## Quality benchmark\n\n");
    md += &format!(
        "`fusekit bench quality{}{}`; accuracy on each task's test split with that task's own head; \
         normalized = accuracy over the expert's own, averaged over tasks; gain kept = the share \
         of the experts' gain over the base (with the same heads) that a model keeps; each \
         method's setting chosen on a validation split.\n\n",
        if small { " --small" } else { "" },
        if seed != 0 { format!(" --seed {seed}") } else { String::new() }
    );
    for r in reports {
        md += &r.table();
        md += "\n";
    }
    std::fs::write(dir.join("quality.md"), md)?;
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>(),
        "seed": seed,
        "small": small,
        "threads": rayon_threads(),
        "suites": reports.iter().map(SuiteReport::json).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("quality.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rows: Vec<Row>) -> SuiteReport {
        SuiteReport {
            name: "t".into(),
            tasks: vec!["a".into(), "b".into()],
            rows,
            training_seconds: 0.0,
            settings: serde_json::Value::Null,
        }
    }

    #[test]
    fn gain_kept_and_normalized_by_hand() {
        let now = Instant::now();
        let rows = vec![
            Row::reference("pre-trained base", vec![0.5, 0.6], now),
            Row::reference("expert: a", vec![0.9, 0.5], now),
            Row::reference("expert: b", vec![0.4, 0.8], now),
            Row::method("m", Family::DataFree, "", vec![], 0.0, vec![0.7, 0.7]),
        ];
        let r = report(rows);
        // Gains: 0.4 on a, 0.2 on b; the merge keeps 0.2 + 0.1.
        assert!((r.gain_kept(&r.rows[3]) - 0.5).abs() < 1e-12);
        assert_eq!(r.gain_kept(&r.rows[0]), 0.0);
        assert!((r.normalized(&r.rows[3]) - (0.7 / 0.9 + 0.7 / 0.8) / 2.0).abs() < 1e-12);
        assert!(r.table().contains("| 50 % |"));
        // Experts no better than the base: nothing to keep.
        let flat = report(vec![
            Row::reference("pre-trained base", vec![0.5, 0.6], now),
            Row::reference("expert: a", vec![0.5, 0.5], now),
            Row::reference("expert: b", vec![0.4, 0.6], now),
        ]);
        assert!(flat.gain_kept(&flat.rows[0]).is_nan());
    }
}
