//! Outputs appear whole or not at all. A merge writes into a temporary directory beside OUT and
//! renames it into place when everything is written; a run killed at any point leaves OUT as it
//! was. What a killed run leaves beside OUT is recognised by the next run and removed (or, for a
//! replaced OUT moved aside, put back).
//!
//! Temporary directories are named `.OUT.fusekit-partial-PID` and hold a lock file that their
//! process keeps locked; the kernel drops the lock when the process dies, so a directory whose
//! process is gone, or whose lock is free, belongs to nobody.

use crate::error::{Error, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = ".fusekit-lock";

/// A temporary directory beside OUT, removed on drop unless it was renamed into place.
pub struct Staging {
    pub dir: PathBuf,
    /// Held (locked) for as long as the directory is in use.
    _lock: File,
    done: bool,
}

impl Staging {
    /// Creates the staging directory for `out` (and OUT's parent if needed), after removing
    /// what killed runs left there.
    pub fn new(out: &Path) -> Result<Staging> {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        clean_abandoned(out)?;
        let dir = sibling(out, "partial", std::process::id());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        lock.try_lock().map_err(|e| Error::Output {
            path: lock_path.clone(),
            message: format!("cannot lock the staging directory: {e}"),
        })?;
        Ok(Staging {
            dir,
            _lock: lock,
            done: false,
        })
    }

    /// Renames the finished directory to `out`, replacing what was there.
    pub fn commit(mut self, out: &Path) -> Result<()> {
        // The lock stays held through the open file until the rename is done.
        let lock_path = self.dir.join(LOCK_FILE);
        std::fs::remove_file(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        replace_dir(&self.dir, out)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Puts directory `new` at `target`, replacing what is there in one step where the file system
/// can swap two directories (Linux `renameat2`); elsewhere the old target is moved aside first,
/// and put back by the next run if this one dies in between.
pub fn replace_dir(new: &Path, target: &Path) -> Result<()> {
    if std::fs::symlink_metadata(target).is_err() {
        return std::fs::rename(new, target).map_err(|e| Error::io(target, e));
    }
    if exchange(new, target).is_ok() {
        // `new` now holds the previous target.
        let _ = std::fs::remove_dir_all(new);
        return Ok(());
    }
    let old = sibling(target, "old", std::process::id());
    let _ = std::fs::remove_dir_all(&old);
    std::fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
    std::fs::rename(new, target).map_err(|e| Error::io(target, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

fn sibling(out: &Path, tag: &str, pid: u32) -> PathBuf {
    out.with_file_name(format!(".{}.fusekit-{tag}-{pid}", output_name(out)))
}

fn output_name(out: &Path) -> String {
    out.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into())
}

/// Removes the staging directories of dead runs beside `out`, and puts back an OUT that a dead
/// run had moved aside to replace it.
fn clean_abandoned(out: &Path) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let prefix = format!(".{}.fusekit-", output_name(out));
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((tag, pid)) = name.strip_prefix(&prefix).and_then(|r| r.rsplit_once('-')) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let path = entry.path();
        if !matches!(tag, "partial" | "old") || pid == std::process::id() || in_use(&path, pid) {
            continue;
        }
        if tag == "old" && std::fs::symlink_metadata(out).is_err() {
            std::fs::rename(&path, out).map_err(|e| Error::io(&path, e))?;
        } else {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Whether the run that made `dir` may still be using it.
fn in_use(dir: &Path, pid: u32) -> bool {
    if !process_alive(pid) {
        return false;
    }
    // The process id may have been reused by another program: the lock tells.
    match File::open(dir.join(LOCK_FILE)) {
        Ok(lock) => lock.try_lock().is_err(),
        // A live process that has not locked yet (or is renaming): leave it.
        Err(_) => true,
    }
}

#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_alive(_: u32) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("f"), text).unwrap();
    }

    fn read(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("f")).unwrap()
    }

    /// A process id that is surely not running: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn replacing_swaps_whole_directories() {
        let root = tempfile::tempdir().unwrap();
        let (new, target) = (root.path().join("new"), root.path().join("target"));
        write(&new, "one");
        replace_dir(&new, &target).unwrap();
        assert_eq!(read(&target), "one");
        write(&new, "two");
        replace_dir(&new, &target).unwrap();
        assert_eq!(read(&target), "two");
        assert!(!new.exists());
    }

    #[test]
    fn dead_runs_are_cleaned_and_live_ones_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("out");
        let dead = dead_pid();
        // A dead run's partial output, and an OUT it had moved aside to replace.
        write(&sibling(&out, "partial", dead), "partial");
        write(&sibling(&out, "old", dead), "previous");
        // A live run (this test's parent process stands in) holding its lock.
        let live = sibling(&out, "partial", std::os::unix::process::parent_id());
        write(&live, "busy");
        let lock = File::create(live.join(LOCK_FILE)).unwrap();
        lock.try_lock().unwrap();
        // Another output's leftovers are not ours to touch.
        write(&sibling(&root.path().join("other"), "partial", dead), "x");

        let staging = Staging::new(&out).unwrap();
        assert!(!sibling(&out, "partial", dead).exists());
        assert_eq!(read(&out), "previous", "the replaced OUT is put back");
        assert!(live.exists());
        assert!(sibling(&root.path().join("other"), "partial", dead).exists());
        drop(lock);
        drop(staging);
        // Its lock released, the live-looking run's directory is abandoned too.
        Staging::new(&out).unwrap().commit(&out).unwrap();
        assert!(!live.exists());
        assert!(!out.join(LOCK_FILE).exists());
        let left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }
}
