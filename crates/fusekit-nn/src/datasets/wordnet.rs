//! WordNet 3.0 glosses (`apt-get install wordnet-base`: `/usr/share/wordnet/data.{noun,verb,adj,
//! adv}`) as four text-classification tasks, as `real-data.md` lists them:
//!
//! | task | input | classes |
//! |---|---|---|
//! | `noun` supersense | noun gloss | 25 lexicographer files (noun.Tops left out) |
//! | `verb` supersense | verb gloss | 15 |
//! | `pos` part of speech | any gloss | 4 (noun, verb, adjective incl. satellites, adverb) |
//! | `adj` adjective type | adjective gloss | 3 (adj.all, adj.pert, adj.ppl) |
//!
//! A data line is `offset lex_filenum ss_type w_cnt words… | gloss`; the licence header's lines
//! start with two spaces. Usage examples (from `; "` on) are cut from the gloss.

use super::Labelled;
use crate::{Error, Result};
use std::path::Path;

/// The lexicographer file numbers that the tasks use (standard WordNet order).
const NOUN_TOPS: u32 = 3;
const FIRST_NOUN: u32 = 4;
const FIRST_VERB: u32 = 29;
const LAST_VERB: u32 = 43;
const ADJ_ALL: u32 = 0;
const ADJ_PERT: u32 = 1;
const ADJ_PPL: u32 = 44;

pub const TASKS: [&str; 4] = ["noun", "verb", "pos", "adj"];

/// One synset: its lexicographer file, part of speech and gloss.
#[derive(Debug, Clone, PartialEq)]
pub struct Synset {
    pub lex_file: u32,
    pub pos: char,
    pub gloss: String,
}

/// The synsets of one `data.*` file's text.
pub fn parse(text: &str) -> Result<Vec<Synset>> {
    let mut synsets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("  ") || line.trim().is_empty() {
            continue;
        }
        let bad = || {
            Error::model(
                "wordnet",
                format!("line {}: not a WordNet data line", i + 1),
            )
        };
        let (head, gloss) = line.split_once(" | ").ok_or_else(bad)?;
        let mut fields = head.split_whitespace();
        let _offset = fields.next().ok_or_else(bad)?;
        let lex_file = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        let pos = fields
            .next()
            .and_then(|f| f.chars().next())
            .ok_or_else(bad)?;
        let gloss = gloss.split("; \"").next().unwrap_or("").trim().to_string();
        synsets.push(Synset {
            lex_file,
            pos,
            gloss,
        });
    }
    Ok(synsets)
}

/// The examples of `task` from the synsets of all four files.
pub fn task(name: &str, synsets: &[Synset]) -> Result<Vec<Labelled>> {
    let label = |s: &Synset| -> Option<u32> {
        match name {
            "noun" => (s.pos == 'n' && s.lex_file != NOUN_TOPS).then(|| s.lex_file - FIRST_NOUN),
            "verb" => (s.pos == 'v' && (FIRST_VERB..=LAST_VERB).contains(&s.lex_file))
                .then(|| s.lex_file - FIRST_VERB),
            "pos" => match s.pos {
                'n' => Some(0),
                'v' => Some(1),
                'a' | 's' => Some(2),
                'r' => Some(3),
                _ => None,
            },
            "adj" => match (s.pos, s.lex_file) {
                ('a' | 's', ADJ_ALL) => Some(0),
                ('a' | 's', ADJ_PERT) => Some(1),
                ('a' | 's', ADJ_PPL) => Some(2),
                _ => None,
            },
            _ => None,
        }
    };
    if !TASKS.contains(&name) {
        return Err(Error::model(
            "wordnet",
            format!("no task `{name}` (tasks: {})", TASKS.join(", ")),
        ));
    }
    Ok(synsets
        .iter()
        .filter(|s| !s.gloss.is_empty())
        .filter_map(|s| {
            label(s).map(|label| Labelled {
                text: s.gloss.clone(),
                label,
            })
        })
        .collect())
}

/// Every synset under `dir` (`data.noun`, `data.verb`, `data.adj`, `data.adv`).
pub fn load(dir: &Path) -> Result<Vec<Synset>> {
    let mut all = Vec::new();
    for part in ["noun", "verb", "adj", "adv"] {
        let path = dir.join(format!("data.{part}"));
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::model(
                path.display().to_string(),
                format!("{e} (install WordNet with `apt-get install -y wordnet-base`)"),
            )
        })?;
        all.extend(parse(&text)?);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOUNS: &str = "  1 This software and database is being provided\n00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived  \n00015388 05 n 01 animal 0 002 @ 00004475 n 0000 | a living organism; \"animals move\"  \n";
    const VERBS: &str =
        "01835496 38 v 01 travel 0 001 @ 01835496 v 0000 | change location; move  \n";
    const ADJS: &str = "00001740 00 a 01 able 0 000 | having the means; \"able to swim\"  \n00002098 01 a 01 solar 0 000 | of the sun  \n00003000 44 s 01 broken 0 000 | physically damaged  \n";

    #[test]
    fn glosses_become_the_four_tasks() {
        let mut all = parse(NOUNS).unwrap();
        all.extend(parse(VERBS).unwrap());
        all.extend(parse(ADJS).unwrap());
        assert_eq!(all.len(), 6, "the licence header is skipped");
        let noun = task("noun", &all).unwrap();
        assert_eq!(
            noun,
            vec![Labelled {
                text: "a living organism".into(),
                label: 1
            }],
            "noun.Tops left out, example cut"
        );
        assert_eq!(task("verb", &all).unwrap()[0].label, 38 - 29);
        let pos: Vec<u32> = task("pos", &all).unwrap().iter().map(|e| e.label).collect();
        assert_eq!(pos, vec![0, 0, 1, 2, 2, 2]);
        let adj: Vec<u32> = task("adj", &all).unwrap().iter().map(|e| e.label).collect();
        assert_eq!(adj, vec![0, 1, 2]);
        assert!(task("color", &all).is_err());
        assert!(parse("garbage line\n").is_err());
    }
}
