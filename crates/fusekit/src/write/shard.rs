//! Header-first shard files: every tensor's size is known from the plan, so the header is written
//! first, the file is sized, and tensors are written at their offsets in any order, in parallel.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::plan::{Plan, Shard};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, TryLockError};

pub struct ShardFile {
    pub file: File,
    /// Where the data section starts.
    pub data_start: u64,
    /// Held while writing. The kernel lets one buffered write into a file at a time (ext4 takes
    /// the inode lock), and a second writer spins on it: measured 6 % of all CPU time of a
    /// two-thread ties merge. A thread that finds the file busy parks its bytes instead and goes
    /// back to computing; whoever holds the file writes them.
    writing: Mutex<()>,
    parked: Mutex<Parked>,
}

/// Writes waiting for the file: (file offset, bytes), and their total size.
#[derive(Default)]
struct Parked {
    writes: Vec<(u64, Vec<u8>)>,
    bytes: usize,
}

/// Most bytes parked per file; a writer beyond it waits for the file.
const PARKED_LIMIT: usize = 16 << 20;

impl ShardFile {
    fn new(file: File, data_start: u64) -> ShardFile {
        ShardFile {
            file,
            data_start,
            writing: Mutex::new(()),
            parked: Mutex::new(Parked::default()),
        }
    }

    /// Writes `bytes` at `offset` of the data section, now or, when another thread is writing
    /// this file, by that thread or a later call ([`ShardFile::flush`] writes what is left).
    pub fn write_at(&self, offset: usize, bytes: &[u8], path: &Path) -> Result<()> {
        let at = self.data_start + offset as u64;
        let writing = match self.writing.try_lock() {
            Ok(writing) => writing,
            Err(TryLockError::WouldBlock) => {
                let mut parked = lock(&self.parked);
                if parked.bytes + bytes.len() <= PARKED_LIMIT {
                    parked.bytes += bytes.len();
                    parked.writes.push((at, bytes.to_vec()));
                    return Ok(());
                }
                drop(parked);
                lock(&self.writing)
            }
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        };
        self.file
            .write_all_at(bytes, at)
            .map_err(|e| Error::io(path, e))?;
        self.write_parked(path)?;
        drop(writing);
        Ok(())
    }

    /// Writes the parked bytes; the caller holds `writing`.
    fn write_parked(&self, path: &Path) -> Result<()> {
        loop {
            let writes = {
                let mut parked = lock(&self.parked);
                parked.bytes = 0;
                std::mem::take(&mut parked.writes)
            };
            if writes.is_empty() {
                return Ok(());
            }
            for (at, bytes) in writes {
                self.file
                    .write_all_at(&bytes, at)
                    .map_err(|e| Error::io(path, e))?;
            }
        }
    }

    /// Writes whatever is parked: every `write_at` so far is then in the file.
    pub fn flush(&self, path: &Path) -> Result<()> {
        let _writing = lock(&self.writing);
        self.write_parked(path)
    }

    /// [`ShardFile::flush`], then waits until the file is on disk.
    pub fn sync(&self, path: &Path) -> Result<()> {
        self.flush(path)?;
        self.file.sync_all().map_err(|e| Error::io(path, e))
    }

    /// Sends bytes `offset..offset + len` of the data section towards the disk now (see
    /// [`start_writeback`]).
    pub fn start_writeback(&self, offset: usize, len: usize) {
        start_writeback(&self.file, self.data_start + offset as u64, len as u64);
    }
}

/// A lock whose holder may have panicked: the data it guards stays usable (a panic fails the
/// merge anyway).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts writing bytes `start..start + len` of `file` to disk without waiting for it, so the
/// disk works while later tensors are computed instead of during the final sync (measured: the
/// sync of a 2.4 GB output took 0.63 s with both cores idle, 1 ms after this). Only a hint:
/// errors surface at the final sync, and where the call does not exist the sync does it all.
pub fn start_writeback(file: &File, start: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; it touches no memory of ours.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                start as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, start, len);
}

/// Allocates the disk blocks of a `len`-byte file up front, where the filesystem can: a full disk
/// is found before the merge starts, not hours into it, and the writes then skip the delayed
/// allocation bookkeeping of every page (measured: ~0.1 s less system time per 2.4 GB).
/// Filesystems without the call are left to allocate as they write.
pub fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; it touches no memory of ours.
        let failed = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off64_t) } != 0;
        if failed {
            let error = std::io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(()),
                _ => Err(error),
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, len);
    Ok(())
}

/// The safetensors header of a shard: `{"__metadata__": {"format": "pt"}, name: {dtype, shape,
/// data_offsets}}`, padded with spaces to a multiple of 8 bytes.
pub fn header(plan: &Plan, shard: &Shard) -> Vec<u8> {
    let entries = shard.tensors.iter().map(|&i| {
        let t = &plan.tensors[i];
        (t.name.as_str(), t.dtype, t.shape.as_slice(), t.offset)
    });
    encode_header(entries)
}

/// Header bytes for `(name, dtype, shape, offset)` entries.
pub fn encode_header<'a>(
    entries: impl Iterator<Item = (&'a str, Dtype, &'a [usize], usize)>,
) -> Vec<u8> {
    let mut entries: Vec<_> = entries.collect();
    entries.sort_by_key(|e| e.3);
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    for (name, dtype, shape, offset) in entries {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        map.insert(name.to_string(), serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + bytes]}));
    }
    let mut bytes = serde_json::to_vec(&map).expect("JSON of plain values");
    bytes.resize(bytes.len().div_ceil(8) * 8, b' ');
    bytes
}

pub fn create(plan: &Plan, shard: &Shard, path: &Path) -> Result<ShardFile> {
    create_with_header(&header(plan, shard), shard.data_bytes, path)
}

pub fn create_with_header(header: &[u8], data_bytes: usize, path: &Path) -> Result<ShardFile> {
    let data_start = 8 + header.len() as u64;
    let mut file = File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(|e| Error::io(path, e))?;
    file.write_all(header).map_err(|e| Error::io(path, e))?;
    let len = data_start + data_bytes as u64;
    file.set_len(len).map_err(|e| Error::io(path, e))?;
    reserve(&file, len).map_err(|e| Error::io(path, e))?;
    Ok(ShardFile::new(file, data_start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_from_many_threads_all_land_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let (pieces, piece) = (4096, 1000);
        let file = create_with_header(b"{}      ", pieces * piece, &path).unwrap();
        // Four threads write interleaved pieces, so they meet at the file and park bytes.
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (file, path) = (&file, &path);
                scope.spawn(move || {
                    for i in (thread..pieces).step_by(4) {
                        let bytes = vec![(i % 251) as u8; piece];
                        file.write_at(i * piece, &bytes, path).unwrap();
                    }
                });
            }
        });
        file.flush(&path).unwrap();
        let data = std::fs::read(&path).unwrap();
        let data = &data[file.data_start as usize..];
        assert_eq!(data.len(), pieces * piece);
        for (i, chunk) in data.chunks(piece).enumerate() {
            assert!(chunk.iter().all(|&b| b == (i % 251) as u8), "piece {i}");
        }
    }
}
