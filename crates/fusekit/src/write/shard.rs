//! Header-first shard files: every tensor's size is known from the plan, so the header is written
//! first, the file is sized, and tensors are written at their offsets in any order, in parallel.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::plan::{Plan, Shard};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub struct ShardFile {
    pub file: File,
    /// Where the data section starts.
    pub data_start: u64,
}

impl ShardFile {
    pub fn write_at(&self, offset: usize, bytes: &[u8], path: &Path) -> Result<()> {
        self.file
            .write_all_at(bytes, self.data_start + offset as u64)
            .map_err(|e| Error::io(path, e))
    }

    /// Sends bytes `offset..offset + len` of the data section towards the disk now (see
    /// [`start_writeback`]).
    pub fn start_writeback(&self, offset: usize, len: usize) {
        start_writeback(&self.file, self.data_start + offset as u64, len as u64);
    }
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
    Ok(ShardFile { file, data_start })
}
