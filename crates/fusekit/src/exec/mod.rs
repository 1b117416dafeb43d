//! Executes a plan: every output tensor computed in parallel and written at its offset, with
//! peak memory bounded by the memory budget whatever the model size.
//!
//! A tensor whose method needs statistics passes is decoded once into memory when its f32 inputs
//! fit the per-thread share of the budget ("resident"); otherwise every pass streams the inputs
//! again from the mapped files, block by block. Both paths hand methods the same blocks, so they
//! give the same bytes. Output is produced in chunks sized from the budget, each encoded and
//! written with one positioned write, and mapped input pages are released once consumed.

use crate::checkpoint::TensorSource;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kernels::convert::{decode, encode, round_slice};
use crate::kernels::BLOCK;
use crate::methods::{TensorContext, TensorMerger, MAX_PASSES};
use crate::plan::{MergeTask, Plan, TensorTask, Work};
use crate::write::shard::ShardFile;
use rayon::prelude::*;
use std::cell::RefCell;
use std::path::Path;
use std::thread::LocalKey;

#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Worker threads; 0 uses every core.
    pub threads: usize,
    /// Upper bound of the merge's working memory in bytes.
    pub memory_budget: usize,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            threads: 0,
            memory_budget: 1 << 30,
        }
    }
}

/// Receives the number of output bytes written, from any thread.
pub trait Progress: Sync {
    fn advance(&self, bytes: u64);
}

impl Progress for () {
    fn advance(&self, _bytes: u64) {}
}

pub struct Output<'a> {
    pub files: &'a [ShardFile],
    pub paths: &'a [std::path::PathBuf],
}

pub fn run(
    plan: &Plan,
    out: &Output,
    options: &ExecOptions,
    progress: &dyn Progress,
) -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .build()
        .map_err(|e| Error::config(format!("cannot start {} threads: {e}", options.threads)))?;
    let threads = pool.current_num_threads();
    let share = (options.memory_budget / threads).max(BLOCK * 64);
    // Largest first, so the long tensors do not start last.
    let mut order: Vec<usize> = (0..plan.tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan.tensors[i].bytes()));
    pool.install(|| {
        order.par_iter().try_for_each(|&i| {
            let task = &plan.tensors[i];
            let writer = Writer {
                file: &out.files[task.shard],
                path: &out.paths[task.shard],
                base_offset: task.offset,
                progress,
            };
            match &task.work {
                Work::Copy(source) => copy(source, &writer, share),
                Work::Merge(merge) => merge_tensor(plan, task, merge, &writer, share),
            }
        })
    })
}

struct Writer<'a> {
    file: &'a ShardFile,
    path: &'a Path,
    base_offset: usize,
    progress: &'a dyn Progress,
}

impl Writer<'_> {
    fn write(&self, byte_offset: usize, bytes: &[u8]) -> Result<()> {
        self.file
            .write_at(self.base_offset + byte_offset, bytes, self.path)?;
        self.progress.advance(bytes.len() as u64);
        Ok(())
    }
}

fn copy(source: &TensorSource, writer: &Writer, share: usize) -> Result<()> {
    let size = source.dtype.size();
    let chunk = (share / size).max(1);
    let numel = source.numel();
    for first in (0..numel).step_by(chunk) {
        let count = chunk.min(numel - first);
        writer.write(first * size, source.bytes(first, count))?;
        release(source, first, count);
    }
    Ok(())
}

/// Drops mapped pages already consumed, so resident memory stays within the budget. The page
/// cache keeps them; this only unmaps them from our process.
fn release(source: &TensorSource, first: usize, count: usize) {
    let size = source.dtype.size();
    // SAFETY: the map is a read-only file mapping; MADV_DONTNEED only drops our view of the
    // pages, which are faulted in again from the file if read later.
    let _ = unsafe {
        source.map.unchecked_advise_range(
            memmap2::UncheckedAdvice::DontNeed,
            source.start + first * size,
            count * size,
        )
    };
}

/// An input as the merge sees it: stored dtype, and the compute dtype it is first rounded to
/// (mergekit casts inputs to `dtype` on load).
struct Input<'a> {
    source: &'a TensorSource,
    cast: Option<Dtype>,
}

impl Input<'_> {
    fn decode(&self, first: usize, out: &mut [f32]) {
        decode(self.source.dtype, self.source.bytes(first, out.len()), out);
        if let Some(dtype) = self.cast {
            round_slice(dtype, out);
        }
    }
}

fn merge_tensor(
    plan: &Plan,
    task: &TensorTask,
    merge: &MergeTask,
    writer: &Writer,
    share: usize,
) -> Result<()> {
    let numel = task.numel();
    let cast = plan.compute_dtype.filter(|d| *d != Dtype::F32);
    let inputs: Vec<Input> = merge
        .inputs
        .iter()
        .map(|i| Input {
            source: &i.source,
            cast: cast.filter(|c| *c != i.source.dtype),
        })
        .collect();
    let ctx = TensorContext {
        name: &task.name,
        numel,
        n_inputs: inputs.len(),
        base: merge.base,
        params: &merge.params,
        rng_keys: &merge.rng_keys,
        compute: cast,
    };
    let mut merger = plan.method.merger(&ctx)?;
    let passes: Vec<usize> = (0..MAX_PASSES).collect();
    // Resident inputs take up to ¾ of the share; output chunks (see `write_output`) the rest.
    let resident_bytes = numel * 4 * inputs.len() * 4 / 3;
    let needs_stats = passes.iter().any(|&p| merger.wants_pass(p));
    if needs_stats && resident_bytes <= share {
        with_arena(&INPUT_ARENA, numel * inputs.len(), |arena| {
            for (input, buf) in inputs.iter().zip(arena.chunks_exact_mut(numel)) {
                input.decode(0, buf);
                release(input.source, 0, numel);
            }
            let resident = Resident { data: arena, numel };
            run_passes(merger.as_mut(), numel, &resident)?;
            // Sequential: a parallel wait here could let this thread start another resident
            // tensor while the arena is held, breaking the budget.
            write_output(
                merger.as_ref(),
                task,
                numel,
                share,
                writer,
                &resident,
                false,
            )
        })
    } else {
        let streamed = Streamed { inputs: &inputs };
        run_passes(merger.as_mut(), numel, &streamed)?;
        write_output(merger.as_ref(), task, numel, share, writer, &streamed, true)
    }
}

/// Where a merge's input blocks come from.
trait BlockSource: Sync {
    /// Calls `f` with block `start..start + len` of every input.
    fn with_block(&self, start: usize, len: usize, f: &mut dyn FnMut(&[&[f32]]));
    /// Elements `first..first + count` will not be needed again in this pass.
    fn consumed(&self, _first: usize, _count: usize) {}
    /// Mapped bytes touched per element (0 once the inputs are in memory).
    fn stored_bytes_per_element(&self) -> usize {
        0
    }
}

/// Inputs decoded once into memory (`numel` values per input, back to back).
struct Resident<'a> {
    data: &'a [f32],
    numel: usize,
}

impl BlockSource for Resident<'_> {
    fn with_block(&self, start: usize, len: usize, f: &mut dyn FnMut(&[&[f32]])) {
        let views: Vec<&[f32]> = self
            .data
            .chunks_exact(self.numel)
            .map(|v| &v[start..start + len])
            .collect();
        f(&views);
    }
}

/// Inputs decoded block by block from the mapped files, pages released behind the reader.
struct Streamed<'a> {
    inputs: &'a [Input<'a>],
}

impl BlockSource for Streamed<'_> {
    fn with_block(&self, start: usize, len: usize, f: &mut dyn FnMut(&[&[f32]])) {
        let mut scratch = vec![0f32; len * self.inputs.len()];
        for (input, buf) in self.inputs.iter().zip(scratch.chunks_exact_mut(len)) {
            input.decode(start, buf);
        }
        let views: Vec<&[f32]> = scratch.chunks_exact(len).collect();
        f(&views);
    }

    fn consumed(&self, first: usize, count: usize) {
        for input in self.inputs {
            release(input.source, first, count);
        }
    }

    fn stored_bytes_per_element(&self) -> usize {
        self.inputs.iter().map(|i| i.source.dtype.size()).sum()
    }
}

thread_local! {
    static INPUT_ARENA: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static OUTPUT_ARENA: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a per-thread buffer of `len` elements that is kept between tensors, so large
/// tensors do not pay page faults and zeroing again and again. Its contents are stale: `f` must
/// write before it reads. Each arena stays within the thread's share of the memory budget.
fn with_arena<T: Clone + Default, R>(
    arena: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let mut buffer = arena.with(|a| std::mem::take(&mut *a.borrow_mut()));
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
    let result = f(&mut buffer[..len]);
    arena.with(|a| *a.borrow_mut() = buffer);
    result
}

/// Statistics passes release input pages every this many elements.
const RELEASE_STRIDE: usize = 1024 * BLOCK;

fn run_passes(merger: &mut dyn TensorMerger, numel: usize, blocks: &dyn BlockSource) -> Result<()> {
    for pass in 0..MAX_PASSES {
        if !merger.wants_pass(pass) {
            continue;
        }
        for first in (0..numel).step_by(RELEASE_STRIDE) {
            let end = (first + RELEASE_STRIDE).min(numel);
            for start in (first..end).step_by(BLOCK) {
                let len = BLOCK.min(numel - start);
                blocks.with_block(start, len, &mut |views| merger.observe(pass, start, views));
            }
            blocks.consumed(first, end - first);
        }
        merger.end_pass(pass)?;
    }
    Ok(())
}

/// Computes and writes the output in chunks of whole blocks.
fn write_output(
    merger: &dyn TensorMerger,
    task: &TensorTask,
    numel: usize,
    share: usize,
    writer: &Writer,
    blocks: &dyn BlockSource,
    parallel: bool,
) -> Result<()> {
    let out_size = task.dtype.size();
    // A chunk's output bytes plus the mapped input pages it touches fit a quarter of the share.
    let chunk =
        ((share / 4 / (out_size + blocks.stored_bytes_per_element())) / BLOCK).max(1) * BLOCK;
    let starts: Vec<usize> = (0..numel).step_by(chunk).collect();
    let one = |&first: &usize| -> Result<()> {
        let count = chunk.min(numel - first);
        with_arena(&OUTPUT_ARENA, count * out_size, |bytes| {
            let mut values = vec![0f32; BLOCK];
            for start in (first..first + count).step_by(BLOCK) {
                let len = BLOCK.min(numel - start);
                blocks.with_block(start, len, &mut |views| {
                    merger.apply(start, views, &mut values[..len])
                });
                let at = (start - first) * out_size;
                encode(
                    task.dtype,
                    &values[..len],
                    &mut bytes[at..at + len * out_size],
                );
            }
            blocks.consumed(first, count);
            writer.write(first * out_size, bytes)
        })
    };
    if parallel {
        starts.par_iter().try_for_each(one)
    } else {
        starts.iter().try_for_each(one)
    }
}
