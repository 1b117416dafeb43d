//! Offline resolution of `org/name[@revision]` in the local Hugging Face cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), laid out as
//! `models--org--name/refs/<revision>` (a commit hash) and `models--org--name/snapshots/<hash>/`.
//! Nothing is ever downloaded.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

pub fn cache_root() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("HF_HUB_CACHE")
        .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| env("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// Whether `reference` looks like a hub repo id (`org/name`, optional `@revision`).
pub fn is_repo_id(reference: &str) -> bool {
    let id = reference.split('@').next().unwrap_or("");
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// The snapshot directory of `reference` inside the cache at `root`.
pub fn resolve_in(root: &Path, reference: &str) -> Result<PathBuf> {
    let (id, revision) = match reference.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (reference, "main"),
    };
    let not_found = |message: String| Error::ModelNotFound {
        model: reference.to_string(),
        message,
    };
    let repo = root.join(format!("models--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        return Err(not_found(format!(
            "not a local directory and not in the Hugging Face cache at {} (fusekit never downloads)",
            root.display()
        )));
    }
    let ref_file = repo.join("refs").join(revision);
    let commit = if ref_file.is_file() {
        std::fs::read_to_string(&ref_file)
            .map_err(|e| Error::io(&ref_file, e))?
            .trim()
            .to_string()
    } else {
        revision.to_string()
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(not_found(format!(
            "revision `{revision}` has no snapshot in {}",
            repo.display()
        )));
    }
    Ok(snapshot)
}

pub fn resolve(reference: &str) -> Result<PathBuf> {
    let root = cache_root().ok_or_else(|| Error::ModelNotFound {
        model: reference.to_string(),
        message: "no Hugging Face cache directory (set HF_HUB_CACHE or HF_HOME)".into(),
    })?;
    resolve_in(&root, reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_refs_and_commits() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--org--tiny");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert!(resolve_in(root.path(), "org/tiny")
            .unwrap()
            .ends_with("snapshots/abc123"));
        assert!(resolve_in(root.path(), "org/tiny@def456")
            .unwrap()
            .ends_with("snapshots/def456"));
        let err = resolve_in(root.path(), "org/tiny@v2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("org/tiny@v2") && err.contains("v2"), "{err}");
        let err = resolve_in(root.path(), "org/other")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/other") && err.contains("never downloads"),
            "{err}"
        );
    }

    #[test]
    fn recognises_repo_ids() {
        assert!(is_repo_id("meta-llama/Llama-3.2-1B"));
        assert!(is_repo_id("org/name@v1.0"));
        assert!(!is_repo_id("./models/a"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("single"));
    }
}
