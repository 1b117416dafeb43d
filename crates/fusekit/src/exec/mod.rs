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
use crate::kernels::convert::{decode, encode, round_to};
use crate::kernels::BLOCK;
use crate::methods::{TensorContext, TensorMerger, MAX_PASSES};
use crate::plan::{MergeTask, Plan, TensorTask, Work};
use crate::write::shard::ShardFile;
use rayon::prelude::*;
use std::path::Path;

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
            out.iter_mut().for_each(|x| *x = round_to(dtype, *x));
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
        round: match cast {
            Some(Dtype::BF16) => |x| round_to(Dtype::BF16, x),
            Some(Dtype::F16) => |x| round_to(Dtype::F16, x),
            _ => |x| x,
        },
    };
    let mut merger = plan.method.merger(&ctx)?;
    let passes: Vec<usize> = (0..MAX_PASSES).collect();
    let resident_bytes = numel * 4 * (inputs.len() + 1);
    let needs_stats = passes.iter().any(|&p| merger.wants_pass(p));
    if needs_stats && resident_bytes <= share {
        let data: Vec<Vec<f32>> = inputs
            .iter()
            .map(|input| {
                let mut v = vec![0f32; numel];
                input.decode(0, &mut v);
                release(input.source, 0, numel);
                v
            })
            .collect();
        let blocks = |start: usize, len: usize, f: &mut dyn FnMut(&[&[f32]])| {
            let views: Vec<&[f32]> = data.iter().map(|v| &v[start..start + len]).collect();
            f(&views);
        };
        run_passes(merger.as_mut(), numel, &blocks)?;
        // Sequential: a parallel wait here could let this thread start another resident tensor
        // while `data` is held, breaking the budget.
        write_output(merger.as_ref(), task, numel, share, writer, &blocks, false)
    } else {
        let blocks = |start: usize, len: usize, f: &mut dyn FnMut(&[&[f32]])| {
            let mut scratch = vec![0f32; len * inputs.len()];
            for (input, buf) in inputs.iter().zip(scratch.chunks_exact_mut(len)) {
                input.decode(start, buf);
            }
            let views: Vec<&[f32]> = scratch.chunks_exact(len).collect();
            f(&views);
        };
        run_passes(merger.as_mut(), numel, &blocks)?;
        write_output(merger.as_ref(), task, numel, share, writer, &blocks, true)?;
        for input in &inputs {
            release(input.source, 0, numel);
        }
        Ok(())
    }
}

type Blocks<'a> = dyn Fn(usize, usize, &mut dyn FnMut(&[&[f32]])) + Sync + 'a;

fn run_passes(merger: &mut dyn TensorMerger, numel: usize, blocks: &Blocks) -> Result<()> {
    for pass in 0..MAX_PASSES {
        if !merger.wants_pass(pass) {
            continue;
        }
        for start in (0..numel).step_by(BLOCK) {
            let len = BLOCK.min(numel - start);
            blocks(start, len, &mut |views| merger.observe(pass, start, views));
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
    blocks: &Blocks,
    parallel: bool,
) -> Result<()> {
    let out_size = task.dtype.size();
    let chunk = ((share / 4 / out_size.max(1)) / BLOCK).max(1) * BLOCK;
    let starts: Vec<usize> = (0..numel).step_by(chunk).collect();
    let one = |&first: &usize| -> Result<()> {
        let count = chunk.min(numel - first);
        let mut bytes = vec![0u8; count * out_size];
        let mut values = vec![0f32; BLOCK];
        for start in (first..first + count).step_by(BLOCK) {
            let len = BLOCK.min(numel - start);
            blocks(start, len, &mut |views| {
                merger.apply(start, views, &mut values[..len])
            });
            let at = (start - first) * out_size;
            encode(
                task.dtype,
                &values[..len],
                &mut bytes[at..at + len * out_size],
            );
        }
        writer.write(first * out_size, &bytes)
    };
    if parallel {
        starts.par_iter().try_for_each(one)
    } else {
        starts.iter().try_for_each(one)
    }
}
