//! One safetensors file: its header, validated without reading tensor data, and a read-only map
//! of its bytes.
//!
//! Validation is strict because a merge runs for minutes over files that may be half-downloaded:
//! the header must parse, every tensor must have a known dtype, byte ranges must tile the data
//! section exactly, and the file must be exactly as long as the header says.

use super::json::UniqueObject;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Headers larger than this are refused, as in the `safetensors` crate.
const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

type ParsedHeader = (
    BTreeMap<String, TensorEntry>,
    BTreeMap<String, String>,
    usize,
);

/// A validated safetensors header: every tensor with its absolute byte range, and the metadata.
#[derive(Debug)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorEntry>,
    /// `__metadata__` of the header.
    pub metadata: BTreeMap<String, String>,
}

impl Header {
    /// The JSON length the first 8 bytes announce, checked against a file of `file_len` bytes.
    fn json_len(prefix: [u8; 8], file_len: u64) -> Result<usize, String> {
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
            return Err(format!(
                "corrupt: header length {header_len} does not fit a file of {file_len} bytes"
            ));
        }
        Ok(header_len as usize)
    }

    /// Validates the header JSON of a file of `file_len` bytes.
    fn parse(json: &[u8], file_len: u64) -> Result<Header, String> {
        let data_start = 8 + json.len();
        let (tensors, metadata, data_len) =
            parse_header(json, data_start).map_err(|m| format!("invalid header: {m}"))?;
        let expected = data_start as u64 + data_len as u64;
        if file_len != expected {
            let what = if file_len < expected {
                "truncated"
            } else {
                "corrupt"
            };
            return Err(format!(
                "{what}: the header describes {expected} bytes but the file has {file_len}"
            ));
        }
        Ok(Header { tensors, metadata })
    }

    /// Validates a whole file held in memory, as [`SafetensorsFile::open`] validates one on disk.
    pub fn from_bytes(bytes: &[u8]) -> Result<Header, String> {
        let prefix = bytes
            .first_chunk::<8>()
            .ok_or("truncated: shorter than the 8-byte header length")?;
        let json_len = Self::json_len(*prefix, bytes.len() as u64)?;
        Self::parse(&bytes[8..8 + json_len], bytes.len() as u64)
    }
}

#[derive(Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// `__metadata__` of the header.
    pub metadata: BTreeMap<String, String>,
    pub map: Arc<Mmap>,
    /// The open file, to notice when it changes under the map.
    pub identity: Arc<InputFile>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut prefix = [0u8; 8];
        file.read_exact(&mut prefix).map_err(|_| {
            Error::bad_file(path, "truncated: shorter than the 8-byte header length")
        })?;
        let json_len = Header::json_len(prefix, file_len).map_err(|m| Error::bad_file(path, m))?;
        let mut json = vec![0u8; json_len];
        file.read_exact(&mut json)
            .map_err(|e| Error::bad_file(path, format!("cannot read header: {e}")))?;
        let header = Header::parse(&json, file_len).map_err(|m| Error::bad_file(path, m))?;
        let identity = Arc::new(InputFile::new(path, file)?);
        // SAFETY: the map is read-only and fusekit never writes to an input path. A file
        // truncated by another process under the map would fault on access; `InputFile` checks
        // the length before every tensor is read and before the output is committed, which
        // narrows that to a race no API can close.
        let map = unsafe { Mmap::map(&identity.file) }.map_err(|e| Error::io(path, e))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            tensors: header.tensors,
            metadata: header.metadata,
            map: Arc::new(map),
            identity,
        })
    }
}

/// An input file as it was when opened: its length and modification time. Inputs may be
/// rewritten by other programs during a long merge; an output computed from a file that
/// changed is refused rather than written.
#[derive(Debug)]
pub struct InputFile {
    pub path: PathBuf,
    file: File,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl InputFile {
    fn new(path: &Path, file: File) -> Result<InputFile> {
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        Ok(InputFile {
            path: path.to_path_buf(),
            file,
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }

    /// Fails if the file's length or modification time differs from when it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = self.file.metadata().map_err(|e| Error::io(&self.path, e))?;
        if meta.len() != self.len || meta.modified().ok() != self.modified {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "changed while being merged (was {} bytes, now {}); nothing was written, \
                     run the merge again once the file is complete",
                    self.len,
                    meta.len()
                ),
            ));
        }
        Ok(())
    }
}

fn parse_header(header: &[u8], data_start: usize) -> Result<ParsedHeader, String> {
    let json: UniqueObject<serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("corrupt header JSON: {e}"))?;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let mut ranges = Vec::new();
    for (name, value) in json.0 {
        if name == "__metadata__" {
            let map = value.as_object().ok_or("`__metadata__` is not an object")?;
            for (k, v) in map {
                let v = v
                    .as_str()
                    .ok_or(format!("`__metadata__.{k}` is not a string"))?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let entry = parse_entry(&name, &value)?;
        ranges.push((entry.begin, entry.end, name.clone()));
        let dtype = Dtype::from_safetensors(&entry.dtype).ok_or(format!(
            "tensor `{name}`: unsupported dtype {}",
            entry.dtype
        ))?;
        let numel = entry
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or(format!("tensor `{name}`: shape overflows"))?;
        let len = entry.end - entry.begin;
        if numel.checked_mul(dtype.size()) != Some(len) {
            return Err(format!(
                "tensor `{name}`: {len} bytes do not hold shape {:?} of {}",
                entry.shape,
                dtype.safetensors_name()
            ));
        }
        tensors.insert(
            name,
            TensorEntry {
                dtype,
                shape: entry.shape,
                start: data_start + entry.begin,
                len,
            },
        );
    }
    ranges.sort();
    let mut cursor = 0;
    for (begin, end, name) in &ranges {
        if *begin != cursor {
            return Err(format!(
                "tensor `{name}` starts at data byte {begin}, expected {cursor} (overlapping or gapped offsets)"
            ));
        }
        cursor = *end;
    }
    Ok((tensors, metadata, cursor))
}

struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

fn parse_entry(name: &str, value: &serde_json::Value) -> Result<RawEntry, String> {
    let bad = |what: &str| format!("tensor `{name}`: {what}");
    let obj = value
        .as_object()
        .ok_or_else(|| bad("entry is not an object"))?;
    let dtype = obj
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("missing dtype"))?
        .to_string();
    let shape = obj
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("missing shape"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .ok_or_else(|| bad("bad shape"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let offsets = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .filter(|a| a.len() == 2)
        .ok_or_else(|| bad("missing data_offsets"))?;
    let begin = offsets[0].as_u64().ok_or_else(|| bad("bad data_offsets"))? as usize;
    let end = offsets[1].as_u64().ok_or_else(|| bad("bad data_offsets"))? as usize;
    if end < begin {
        return Err(bad("data_offsets end before begin"));
    }
    Ok(RawEntry {
        dtype,
        shape,
        begin,
        end,
    })
}
