//! Executes a plan: every output tensor computed in parallel and written at its offset, with
//! peak memory bounded by the memory budget whatever the model size.
//!
//! Inputs are never held whole: every statistics pass and the final merge pass decode them block
//! by block from the mapped files (decoding bf16 costs less than keeping f32 copies, measured on
//! the benchmark), and mapped pages are released behind the reader (between a tensor's passes
//! only when the tensor is large). Output is produced in chunks sized from the budget, chunks of
//! one tensor in parallel, each encoded and written in pieces small enough to stay in cache until
//! the kernel copies them. Methods see the same fixed blocks whatever the chunking, so the bytes
//! do not depend on the budget or the thread count.

mod gate;

use crate::checkpoint::TensorSource;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kernels::convert::{encode, round_slice};
use crate::kernels::finite::{describe, first_nonfinite_stored};
use crate::kernels::{with_scratch, BLOCK};
use crate::methods::{ModelStatistics, TensorContext, TensorMerger, MAX_PASSES};
use crate::plan::{MergeInput, MergeTask, Plan, TensorTask, Work};
use crate::write::shard::ShardFile;
use rayon::prelude::*;
use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Worker threads; 0 uses every core.
    pub threads: usize,
    /// Upper bound of the merge's working memory in bytes.
    pub memory_budget: usize,
    /// Merge inputs that hold NaN or infinity instead of refusing them.
    pub allow_nonfinite: bool,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            threads: 0,
            memory_budget: 1 << 30,
            allow_nonfinite: false,
        }
    }
}

/// Receives the number of output bytes written, from any thread.
pub trait Progress: Sync {
    fn advance(&self, bytes: u64);
    /// A merge step starts, with this many bytes to write (the name is empty for a
    /// single-document config).
    fn step(&self, _name: &str, _total_bytes: u64) {}
    /// A step's existing output is reused.
    fn reused(&self, _name: &str, _dir: &std::path::Path) {}
    /// A model-wide statistics pass (`pass`, 0-based) has read `done` of `total` tensors; no
    /// output bytes are written meanwhile.
    fn statistics(&self, _pass: usize, _done: usize, _total: usize) {}
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
    let gate = gate::MemoryGate::new(options.memory_budget);
    let model_stats =
        pool.install(|| gather_model_statistics(plan, share, &gate, options, progress))?;
    let model_stats = model_stats.as_deref();
    pool.install(|| {
        each_in_turn(&order, threads, |i| {
            let task = &plan.tensors[i];
            let writer = Writer {
                file: &out.files[task.shard],
                path: &out.paths[task.shard],
                base_offset: task.offset,
                progress,
            };
            match &task.work {
                Work::Copy(source) => copy(task, source, &writer, share, options),
                Work::Merge(merge) => merge_tensor(
                    plan,
                    task,
                    merge,
                    &writer,
                    share,
                    &gate,
                    model_stats,
                    options,
                ),
            }?;
            writer.finish(task.bytes());
            Ok(())
        })
    })
}

/// Runs `work` on every index of `order`, each of `threads` workers taking the next index as it
/// frees up, so with the largest tensors first the last to finish are the smallest. (A parallel
/// iterator splits the list in halves up front: one thread could be left alone on a large
/// tensor's statistics passes, measured as seconds at half the cores on Arcee Fusion.) Stops at
/// the first error.
fn each_in_turn(
    order: &[usize],
    threads: usize,
    work: impl Fn(usize) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    rayon::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|_| loop {
                let at = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = order.get(at) else { break };
                if let Err(e) = work(i) {
                    failure.lock().expect("failure lock").get_or_insert(e);
                    next.store(order.len(), Ordering::Relaxed);
                }
            });
        }
    });
    match failure.into_inner().expect("failure lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
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

    /// The tensor's `len` bytes are all written: they can go to disk now.
    fn finish(&self, len: usize) {
        self.file.start_writeback(self.base_offset, len);
    }
}

fn copy(
    task: &TensorTask,
    source: &TensorSource,
    writer: &Writer,
    share: usize,
    options: &ExecOptions,
) -> Result<()> {
    source.check_unchanged()?;
    let size = source.dtype.size();
    let chunk = (share / size).max(1);
    let numel = source.numel();
    for first in (0..numel).step_by(chunk) {
        let count = chunk.min(numel - first);
        let bytes = source.bytes(first, count);
        if !options.allow_nonfinite {
            if let Some(i) = first_nonfinite_stored(source.dtype, bytes) {
                let mut value = [0f32];
                source.read_f32(first + i, &mut value);
                return Err(nonfinite(
                    &task.name,
                    &source.file.path.display().to_string(),
                    first + i,
                    value[0],
                ));
            }
        }
        writer.write(first * size, bytes)?;
        release(source, first, count);
    }
    Ok(())
}

/// Drops mapped pages already consumed, so resident memory stays within the budget. The page
/// cache keeps them; this only unmaps them from our process.
fn release(source: &TensorSource, first: usize, count: usize) {
    if source.rows.is_some() {
        // Read out of order through a permutation: nothing is behind the reader.
        return;
    }
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
    /// The input tensor and its model, for errors.
    tensor: &'a str,
    model: &'a str,
    /// Refuse NaN and infinity.
    finite: bool,
}

impl Input<'_> {
    fn decode(&self, first: usize, out: &mut [f32]) -> Result<()> {
        if !self.finite {
            self.source.read_f32(first, out);
        } else if !self.source.read_f32_finite(first, out) {
            let i = out
                .iter()
                .position(|v| !v.is_finite())
                .expect("a value is not finite");
            return Err(nonfinite(self.tensor, self.model, first + i, out[i]));
        }
        if let Some(dtype) = self.cast {
            round_slice(dtype, out);
        }
        Ok(())
    }
}

fn nonfinite(tensor: &str, model: &str, element: usize, value: f32) -> Error {
    Error::tensor(
        tensor,
        format!(
            "`{model}` holds {} at element {element}; a merge would spread it (pass \
             --allow-nonfinite to merge anyway)",
            describe(value)
        ),
    )
}

pub type ModelStats = dyn std::any::Any + Send + Sync;

/// The method's view of one planned tensor.
fn context<'a>(
    plan: &Plan,
    task: &'a TensorTask,
    merge: &'a MergeTask,
    share: usize,
    model_stats: Option<&'a ModelStats>,
) -> TensorContext<'a> {
    TensorContext {
        name: &task.name,
        numel: task.numel(),
        shape: &task.shape,
        n_inputs: merge.inputs.len(),
        base: merge.base,
        params: &merge.params,
        rng_keys: &merge.rng_keys,
        compute: compute_cast(plan),
        // Output chunks take half the share (`write_output`), statistics the other half.
        memory: share / 2,
        models: &merge.models,
        model_stats,
    }
}

fn compute_cast(plan: &Plan) -> Option<Dtype> {
    plan.compute_dtype.filter(|d| *d != Dtype::F32)
}

/// A merge's inputs as the method reads them.
fn inputs_of<'a>(plan: &'a Plan, merge: &'a MergeTask, options: &ExecOptions) -> Vec<Input<'a>> {
    let cast = compute_cast(plan);
    let input = |i: &'a MergeInput, cast: Option<Dtype>| Input {
        source: &i.source,
        cast: cast.filter(|c| *c != i.source.dtype),
        tensor: &i.tensor,
        model: &plan.models[i.model].reference,
        finite: !options.allow_nonfinite,
    };
    // Statistics (Fisher diagonals) keep f32: rounded to bf16 they would underflow.
    let companions = merge.companions.iter().map(|i| input(i, None));
    merge
        .inputs
        .iter()
        .map(|i| input(i, cast))
        .chain(companions)
        .collect()
}

/// The method's model-wide statistics for a plan, gathered as a merge would (continual merging
/// reads them to choose the next step's parameters).
pub fn model_statistics(plan: &Plan, options: &ExecOptions) -> Result<Option<Arc<ModelStats>>> {
    let threads = if options.threads == 0 {
        rayon::current_num_threads()
    } else {
        options.threads
    };
    gather_model_statistics(
        plan,
        (options.memory_budget / threads).max(BLOCK * 64),
        &gate::MemoryGate::new(options.memory_budget),
        options,
        &(),
    )
}

/// Runs the method's model-wide statistics passes, if it has any: every merged tensor in plan
/// order, each block in order.
fn gather_model_statistics(
    plan: &Plan,
    share: usize,
    gate: &gate::MemoryGate,
    options: &ExecOptions,
    progress: &dyn Progress,
) -> Result<Option<Arc<ModelStats>>> {
    let merges: Vec<(&TensorTask, &MergeTask)> = plan
        .tensors
        .iter()
        .filter_map(|t| match &t.work {
            Work::Merge(m) => Some((t, m)),
            Work::Copy(_) => None,
        })
        .collect();
    let contexts: Vec<TensorContext> = merges
        .iter()
        .map(|(t, m)| context(plan, t, m, share, None))
        .collect();
    let Some(mut stats) = plan.method.model_statistics(&contexts)? else {
        return Ok(None);
    };
    // Tensors in parallel, each into its own part; parts are added back in plan order.
    let group = rayon::current_num_threads() * 2;
    let work: Vec<(&MergeTask, &TensorContext)> =
        merges.iter().map(|(_, m)| *m).zip(&contexts).collect();
    for pass in 0..MAX_PASSES {
        if !stats.wants_pass(pass) {
            continue;
        }
        let mut done = 0;
        for chunk in work.chunks(group) {
            let mut parts: Vec<Box<dyn ModelStatistics>> =
                chunk.iter().map(|_| stats.fork()).collect();
            parts
                .par_iter_mut()
                .zip(chunk)
                .try_for_each(|(part, (merge, ctx))| -> Result<()> {
                    let _admitted = gate.admit(plan.method.held_bytes(ctx));
                    let inputs = inputs_of(plan, merge, options);
                    let blocks = Inputs(&inputs);
                    blocks.check_unchanged()?;
                    for start in (0..ctx.numel).step_by(BLOCK) {
                        let len = BLOCK.min(ctx.numel - start);
                        blocks.with_block(start, len, &mut |views| {
                            part.observe(pass, ctx, start, views)
                        })?;
                    }
                    blocks.consumed(0, ctx.numel);
                    Ok(())
                })?;
            for part in parts {
                stats.absorb(part);
            }
            done += chunk.len();
            progress.statistics(pass, done, work.len());
        }
        stats.end_pass(pass)?;
    }
    if stats.wants_pass(MAX_PASSES) {
        return Err(Error::config(format!(
            "`{}` needed more than {MAX_PASSES} model-wide statistics passes",
            plan.method.spec().name
        )));
    }
    Ok(Some(stats.finish()))
}

#[allow(clippy::too_many_arguments)]
fn merge_tensor(
    plan: &Plan,
    task: &TensorTask,
    merge: &MergeTask,
    writer: &Writer,
    share: usize,
    gate: &gate::MemoryGate,
    model_stats: Option<&ModelStats>,
    options: &ExecOptions,
) -> Result<()> {
    let numel = task.numel();
    let inputs = inputs_of(plan, merge, options);
    let ctx = context(plan, task, merge, share, model_stats);
    let _admitted = gate.admit(plan.method.held_bytes(&ctx));
    let mut merger = plan.method.merger(&ctx)?;
    let inputs = Inputs(&inputs);
    inputs.check_unchanged()?;
    // A tensor whose mapped inputs fit a quarter of the share keeps them mapped from pass to
    // pass: unmapping and faulting them in again cost ~5 % of a two-pass merge's CPU.
    let keep_mapped = numel * inputs.stored_bytes_per_element() <= share / 4;
    run_passes(merger.as_mut(), numel, &inputs, keep_mapped)?;
    if merger.wants_pass(MAX_PASSES) {
        return Err(Error::tensor(
            &task.name,
            format!(
                "`{}` needed more than {MAX_PASSES} statistics passes",
                plan.method.spec().name
            ),
        ));
    }
    write_output(merger.as_ref(), task, numel, share, writer, &inputs)
}

/// A tensor's inputs, read block by block from the mapped files.
struct Inputs<'a>(&'a [Input<'a>]);

impl Inputs<'_> {
    /// Calls `f` with block `start..start + len` of every input, decoded to f32.
    fn with_block(&self, start: usize, len: usize, f: &mut dyn FnMut(&[&[f32]])) -> Result<()> {
        with_scratch(len * self.0.len(), |scratch| {
            for (input, buf) in self.0.iter().zip(scratch.chunks_exact_mut(len)) {
                input.decode(start, buf)?;
            }
            let views: Vec<&[f32]> = scratch.chunks_exact(len).collect();
            f(&views);
            Ok(())
        })
    }

    /// Fails if an input file changed since it was opened (reading a truncated map would fault).
    fn check_unchanged(&self) -> Result<()> {
        self.0.iter().try_for_each(|i| i.source.check_unchanged())
    }

    /// Elements `first..first + count` are not needed again in this pass.
    fn consumed(&self, first: usize, count: usize) {
        for input in self.0 {
            release(input.source, first, count);
        }
    }

    /// Mapped bytes touched per element.
    fn stored_bytes_per_element(&self) -> usize {
        self.0.iter().map(|i| i.source.dtype.size()).sum()
    }
}

thread_local! {
    static OUTPUT_ARENA: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a per-thread output buffer of `len` bytes that is kept between tensors, so large
/// tensors do not pay page faults and zeroing again and again. Its contents are stale: `f` must
/// write before it reads. It stays within the thread's share of the memory budget.
fn with_output_buffer<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let arena = &OUTPUT_ARENA;
    let mut buffer = arena.with(|a| std::mem::take(&mut *a.borrow_mut()));
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    let result = f(&mut buffer[..len]);
    arena.with(|a| *a.borrow_mut() = buffer);
    result
}

/// The block length of a statistics pass: whole rows where the merger works on rows of
/// `row_len` (as many as fit `BLOCK`, at least one), unless a row is too long to decode whole.
fn pass_block(row_len: Option<usize>) -> usize {
    match row_len {
        Some(row_len) if row_len > 0 && row_len <= MAX_ROW_BLOCK => {
            row_len * (BLOCK / row_len).max(1)
        }
        _ => BLOCK,
    }
}

/// The longest row a statistics pass decodes as one block (the scratch holds a block of every
/// input in f32: 256 KiB each).
const MAX_ROW_BLOCK: usize = 16 * BLOCK;

/// Statistics passes release input pages every this many elements.
const RELEASE_STRIDE: usize = 1024 * BLOCK;

fn run_passes(
    merger: &mut dyn TensorMerger,
    numel: usize,
    blocks: &Inputs,
    keep_mapped: bool,
) -> Result<()> {
    for pass in 0..MAX_PASSES {
        if !merger.wants_pass(pass) {
            continue;
        }
        let block = pass_block(merger.pass_row_len());
        let stride = RELEASE_STRIDE / block * block;
        for first in (0..numel).step_by(stride) {
            let end = (first + stride).min(numel);
            for start in (first..end).step_by(block) {
                if merger.wants_block(pass, start) {
                    let len = block.min(numel - start);
                    blocks
                        .with_block(start, len, &mut |views| merger.observe(pass, start, views))?;
                }
            }
            if !keep_mapped {
                blocks.consumed(first, end - first);
            }
        }
        merger.end_pass(pass)?;
    }
    Ok(())
}

/// Output bytes per positioned write. The kernel copies a write into the page cache from our
/// buffer; a piece this small is still in the core's L2 cache when it is copied, where a
/// multi-megabyte one is not (measured: 2.4 GB written in 1 MiB writes 0.6 s, in 8 MiB ones
/// 1.2–3 s; the kernel's copy fell from 30 % of a slerp merge's CPU time to 5 %).
const WRITE_PIECE_BYTES: usize = 128 << 10;

/// Computes and writes the output in chunks of whole blocks, each written in pieces.
fn write_output(
    merger: &dyn TensorMerger,
    task: &TensorTask,
    numel: usize,
    share: usize,
    writer: &Writer,
    blocks: &Inputs,
) -> Result<()> {
    let out_size = task.dtype.size();
    // A chunk's mapped input pages fit half the share.
    let chunk =
        ((share / 2 / (out_size + blocks.stored_bytes_per_element())) / BLOCK).max(1) * BLOCK;
    let piece = (WRITE_PIECE_BYTES / (out_size * BLOCK)).max(1) * BLOCK;
    let starts: Vec<usize> = (0..numel).step_by(chunk).collect();
    let one = |&first: &usize| -> Result<()> {
        let end = (first + chunk).min(numel);
        with_output_buffer(piece.min(end - first) * out_size, |bytes| {
            with_scratch(BLOCK, |values| -> Result<()> {
                for piece_start in (first..end).step_by(piece) {
                    let piece_end = (piece_start + piece).min(end);
                    for start in (piece_start..piece_end).step_by(BLOCK) {
                        let len = BLOCK.min(piece_end - start);
                        blocks.with_block(start, len, &mut |views| {
                            merger.apply(start, views, &mut values[..len])
                        })?;
                        let at = (start - piece_start) * out_size;
                        encode(
                            task.dtype,
                            &values[..len],
                            &mut bytes[at..at + len * out_size],
                        );
                    }
                    let written = (piece_end - piece_start) * out_size;
                    writer.write(piece_start * out_size, &bytes[..written])?;
                }
                Ok(())
            })?;
            blocks.consumed(first, end - first);
            Ok(())
        })
    };
    starts.par_iter().try_for_each(one)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_blocks_hold_whole_rows() {
        assert_eq!(pass_block(None), BLOCK);
        assert_eq!(pass_block(Some(100)), 100 * (BLOCK / 100));
        assert_eq!(pass_block(Some(BLOCK + 904)), BLOCK + 904);
        assert_eq!(pass_block(Some(MAX_ROW_BLOCK)), MAX_ROW_BLOCK);
        // Rows too long to decode whole, and degenerate ones, fall back to plain blocks.
        assert_eq!(pass_block(Some(MAX_ROW_BLOCK + 1)), BLOCK);
        assert_eq!(pass_block(Some(0)), BLOCK);
        // Release strides stay whole blocks.
        for row_len in [1, 100, BLOCK + 904, MAX_ROW_BLOCK] {
            let block = pass_block(Some(row_len));
            assert!(RELEASE_STRIDE / block * block > 0, "{row_len}");
        }
    }
}
