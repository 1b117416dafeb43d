//! The plan: from a config and the inputs' headers, every output tensor with its method inputs,
//! resolved parameters, output dtype, shard and byte offset, plus the small files to write.
//! Building it reads no tensor data (but for the mean row that `pad_to_multiple_of` pads a new
//! vocabulary with), so `--dry-run` is instant and every config error surfaces before a byte is
//! written.

mod modules;
mod params;
pub mod shards;

use crate::arch::{self, Position};
use crate::checkpoint::{Checkpoint, TensorSource};
use crate::config::{self, error_at, LoadedConfig};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::methods::{self, BasePolicy, Method, ResolvedParams};
use crate::vocab::{self, Vocabulary};
use modules::Module;
use params::{InputParams, ParamScope};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Largest shard in bytes (a tensor larger than this gets a shard of its own).
    pub max_shard_size: usize,
    /// Seed of the random streams (DARE masks).
    pub seed: u64,
}

impl std::default::Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_shard_size: 5_000_000_000,
            seed: 0,
        }
    }
}

pub struct Plan {
    pub method: &'static dyn Method,
    pub models: Vec<Checkpoint>,
    pub base: Option<usize>,
    pub tensors: Vec<TensorTask>,
    pub shards: Vec<Shard>,
    /// `config.json` of the output.
    pub output_config: serde_json::Value,
    /// Model whose tokenizer and generation config are copied.
    pub tokenizer_donor: usize,
    /// The output vocabulary, when the config asks for one (`tokenizer_source`, `tokenizer:`);
    /// its tokenizer replaces the donor's `tokenizer.json`.
    pub vocabulary: Option<Vocabulary>,
    pub chat_template: Option<String>,
    pub config_text: String,
    pub compute_dtype: Option<Dtype>,
    pub seed: u64,
    /// The statistics checkpoint of each model (indexed like `models`) when the method reads
    /// one (`data: {MODEL: {fisher: DIR}}`).
    pub companions: Vec<Option<Checkpoint>>,
}

pub struct Shard {
    pub name: String,
    /// Indices into `Plan::tensors`.
    pub tensors: Vec<usize>,
    pub data_bytes: usize,
}

pub struct TensorTask {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub shard: usize,
    /// Offset inside the shard's data section.
    pub offset: usize,
    pub work: Work,
}

pub enum Work {
    /// Bytes copied verbatim (integer tensors, plain passthrough).
    Copy(TensorSource),
    Merge(MergeTask),
}

pub struct MergeTask {
    pub inputs: Vec<MergeInput>,
    /// The method's per-model statistics of the same tensor, one per input (see
    /// `Method::companion`); empty for most methods.
    pub companions: Vec<MergeInput>,
    /// The plan's model index of each input.
    pub models: Vec<usize>,
    pub base: Option<usize>,
    pub params: ResolvedParams,
    pub rng_keys: Vec<u64>,
}

pub struct MergeInput {
    pub model: usize,
    pub tensor: String,
    pub source: TensorSource,
}

impl TensorTask {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

impl Plan {
    pub fn total_bytes(&self) -> usize {
        self.tensors.iter().map(TensorTask::bytes).sum()
    }

    /// Bytes the merge reads from the inputs.
    pub fn input_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| match &t.work {
                Work::Copy(s) => s.len,
                Work::Merge(m) => m.inputs.iter().map(|i| i.source.len).sum(),
            })
            .sum()
    }
}

struct Source {
    model: usize,
    start: usize,
    end: usize,
    params: ParamScope,
}

/// One part of the merge: the whole model, or one module with its own slices and parameters.
struct Part {
    module: Module,
    slices: Vec<Slice>,
    params: ParamScope,
}

struct Slice {
    sources: Vec<Source>,
    params: ParamScope,
    base: Option<usize>,
}

/// Opens each referenced model once, in the order the config names them.
struct Models {
    list: Vec<Checkpoint>,
}

impl Models {
    fn open(&mut self, reference: &Spanned<String>, key: &str) -> Result<usize> {
        if let Some(i) = self
            .list
            .iter()
            .position(|m| m.reference == reference.value)
        {
            return Ok(i);
        }
        let model = Checkpoint::open(&reference.value).map_err(|e| match e {
            Error::ModelNotFound { .. } => error_at(reference, key, e),
            other => other,
        })?;
        self.list.push(model);
        Ok(self.list.len() - 1)
    }
}

pub fn build(loaded: &LoadedConfig, options: &PlanOptions) -> Result<Plan> {
    let c = &loaded.config;
    let method = methods::lookup(&c.merge_method.value).ok_or_else(|| {
        if methods::LEARNED.contains(&c.merge_method.value.as_str()) {
            return error_at(
                &c.merge_method,
                "merge_method",
                format!(
                    "`{}` runs the models over data before merging: `fusekit merge` built \
                     with `--features nn` does that (not --dry-run)",
                    c.merge_method.value
                ),
            );
        }
        let names: Vec<&str> = methods::all().iter().map(|m| m.spec().name).collect();
        error_at(
            &c.merge_method,
            "merge_method",
            format!(
                "unknown method `{}` (available: {})",
                c.merge_method.value,
                names.join(", ")
            ),
        )
    })?;
    let spec = method.spec();
    let dtype_of = |d: &Option<Spanned<String>>, key| {
        d.as_ref()
            .map(|s| Dtype::from_config(&s.value).map_err(|e| error_at(s, key, e)))
            .transpose()
    };
    let compute_dtype = dtype_of(&c.dtype, "dtype")?;
    let out_dtype = dtype_of(&c.out_dtype, "out_dtype")?;

    let mut models = Models { list: Vec::new() };
    let base = c
        .base_model
        .as_ref()
        .map(|b| models.open(b, "base_model"))
        .transpose()?;
    let top = ParamScope::parse(c.parameters.as_ref(), spec)?;
    let mut parts = Vec::new();
    match &c.modules {
        None => parts.push(Part {
            module: Module::WHOLE,
            slices: build_slices(
                c.models.as_ref(),
                c.slices.as_ref(),
                &mut models,
                base,
                spec,
                Module::WHOLE,
            )?,
            params: ParamScope::default(),
        }),
        Some(modules) => {
            for (name, m) in modules {
                let module = Module::named(name)?;
                let slices = build_slices(
                    m.models.as_ref(),
                    m.slices.as_ref(),
                    &mut models,
                    base,
                    spec,
                    module,
                )
                .map_err(|e| e.context(&format!("modules.{name}")))?;
                parts.push(Part {
                    module,
                    slices,
                    params: ParamScope::parse(m.parameters.as_ref(), spec)?,
                });
            }
        }
    }
    for part in &parts {
        check_inputs(spec, part)?;
    }
    check_modules_cover(&parts, &models)?;

    let all_slices: Vec<&Slice> = parts.iter().flat_map(|p| &p.slices).collect();
    let first_model = all_slices[0].sources[0].model;
    let (tokenizer_donor, vocabulary) = tokenizer_plan(loaded, &mut models, base, &all_slices)?;
    let companions = open_companions(c, method, &models, &all_slices)?;
    let donor_config = base.unwrap_or(first_model);
    let mut output_config = output_config(
        &models.list[donor_config].config,
        out_dtype.or(compute_dtype),
    );
    let mut tensors = Vec::new();
    for part in &parts {
        let scopes = [&part.params, &top];
        let planner = TensorPlanner {
            models: &models,
            method,
            scopes: &scopes,
            compute_dtype,
            out_dtype,
            seed: options.seed,
            vocabulary: vocabulary.as_ref(),
            companions: &companions,
        };
        let layers = planner.plan_part(part, &mut tensors)?;
        part.module.set_layer_count(&mut output_config, layers);
    }
    let shards = assign_shards(&mut tensors, options.max_shard_size);
    if let Some(v) = &vocabulary {
        set_vocab_size(&mut output_config, v.rows);
    }
    let chat_template = c
        .chat_template
        .as_ref()
        .map(|t| chat_template(t, &models.list))
        .transpose()?;
    Ok(Plan {
        method,
        models: models.list,
        base,
        tensors,
        shards,
        output_config,
        tokenizer_donor,
        vocabulary,
        chat_template,
        config_text: loaded.text.clone(),
        compute_dtype,
        seed: options.seed,
        companions,
    })
}

/// Opens the statistics checkpoint of every input model when the method reads one; `data:`
/// entries for models that are not inputs are refused, so a typo does not go unnoticed.
fn open_companions(
    c: &config::MergeConfig,
    method: &dyn methods::Method,
    models: &Models,
    slices: &[&Slice],
) -> Result<Vec<Option<Checkpoint>>> {
    let data = c.data.as_ref();
    let mut companions: Vec<Option<Checkpoint>> = models.list.iter().map(|_| None).collect();
    for key in data.iter().flat_map(|d| d.keys()) {
        if !models.list.iter().any(|m| &m.reference == key) {
            return Err(Error::config(format!(
                "`data.{key}`: `{key}` is not a model of this merge"
            )));
        }
    }
    let Some(kind) = method.companion() else {
        if let Some(key) = data.and_then(|d| d.keys().next()) {
            return Err(Error::config(format!(
                "`data.{key}`: `{}` reads no data",
                method.spec().name
            )));
        }
        return Ok(companions);
    };
    for model in slices.iter().flat_map(|s| &s.sources).map(|s| s.model) {
        if companions[model].is_some() {
            continue;
        }
        let reference = &models.list[model].reference;
        let entry = data.and_then(|d| d.get(reference));
        let path = entry.and_then(|e| match kind {
            methods::Companion::Fisher => e.fisher.as_ref(),
        });
        let path = path.ok_or_else(|| {
            let from_file = if entry.is_some_and(|e| e.file.is_some()) {
                ", or have `fusekit merge` built with `--features nn` compute it from `file`"
            } else {
                ""
            };
            Error::config(format!(
                "`{}` needs `data: {{{reference}: {{{}: DIR}}}}` (make DIR with `fusekit {}`{from_file})",
                method.spec().name,
                kind.key(),
                kind.key()
            ))
        })?;
        let checkpoint = Checkpoint::open(&path.value).map_err(|e| match e {
            Error::ModelNotFound { .. } => error_at(path, kind.key(), e),
            other => other,
        })?;
        companions[model] = Some(checkpoint);
    }
    Ok(companions)
}

/// Every slice needs the base the method needs and as many inputs as it takes.
fn check_inputs(spec: &methods::MethodSpec, part: &Part) -> Result<()> {
    if spec.base == BasePolicy::Required && part.slices.iter().any(|s| s.base.is_none()) {
        return Err(Error::config(format!("`{}` needs `base_model`", spec.name)));
    }
    for (i, slice) in part.slices.iter().enumerate() {
        let n = slice.sources.len();
        if n < spec.min_inputs || spec.max_inputs.is_some_and(|max| n > max) {
            let want = match spec.max_inputs {
                Some(max) if max == spec.min_inputs => format!("exactly {max}"),
                Some(max) => format!("{}–{max}", spec.min_inputs),
                None => format!("at least {}", spec.min_inputs),
            };
            return Err(Error::config(format!(
                "`{}` takes {want} input models, slice {i} of {} has {n}",
                spec.name,
                part.module.name()
            )));
        }
    }
    Ok(())
}

/// With `modules`, every tensor of the reference model must belong to a listed module.
fn check_modules_cover(parts: &[Part], models: &Models) -> Result<()> {
    if parts.iter().any(|p| p.module.is_whole()) {
        return Ok(());
    }
    let reference = &models.list[parts[0].slices[0].sources[0].model];
    if let Some(orphan) = reference
        .tensor_names()
        .find(|n| !parts.iter().any(|p| p.module.owns(n)))
    {
        return Err(Error::config(format!(
            "`{orphan}` belongs to module `{}`, which `modules` does not list",
            Module::of(orphan).name()
        )));
    }
    Ok(())
}

/// The slices of one part: the `models` form (one slice over all layers) or `slices`.
fn build_slices(
    list: Option<&Vec<config::InputModel>>,
    slice_list: Option<&Vec<config::InputSlice>>,
    models: &mut Models,
    base: Option<usize>,
    spec: &'static methods::MethodSpec,
    module: Module,
) -> Result<Vec<Slice>> {
    let uses_base = spec.base != BasePolicy::Unused;
    if let Some(list) = list {
        let mut sources = Vec::new();
        for m in list {
            let model = models.open(&m.model, "model")?;
            let end = module.layer_count(&models.list[model]);
            sources.push(Source {
                model,
                start: 0,
                end,
                params: ParamScope::parse(m.parameters.as_ref(), spec)?,
            });
        }
        if let Some(b) = base.filter(|&b| uses_base && !sources.iter().any(|s| s.model == b)) {
            // As mergekit: a base that is not among `models` joins as an input.
            sources.push(Source {
                model: b,
                start: 0,
                end: module.layer_count(&models.list[b]),
                params: ParamScope::default(),
            });
        }
        let counts: Vec<usize> = sources.iter().map(|s| s.end).collect();
        if counts.iter().any(|&n| n != counts[0]) {
            let described: Vec<String> = sources
                .iter()
                .map(|s| format!("{} has {}", models.list[s.model].reference, s.end))
                .collect();
            return Err(Error::config(format!(
                "models have different layer counts ({}); use `slices` to pick layers",
                described.join(", ")
            )));
        }
        let base = base.filter(|_| uses_base);
        return Ok(vec![Slice {
            sources,
            params: ParamScope::default(),
            base,
        }]);
    }
    let mut slices = Vec::new();
    for (i, s) in slice_list.into_iter().flatten().enumerate() {
        let slice_base = match &s.base_model {
            Some(b) => Some(models.open(b, "base_model")?),
            None => base,
        };
        let mut sources = Vec::new();
        for src in &s.sources {
            let model = models.open(&src.model, "model")?;
            let [start, end] = src.layer_range.value;
            let available = module.layer_count(&models.list[model]);
            if end > available {
                return Err(error_at(
                    &src.layer_range,
                    "layer_range",
                    format!(
                        "[{start}, {end}] exceeds the {available} layers of `{}`",
                        src.model.value
                    ),
                ));
            }
            sources.push(Source {
                model,
                start,
                end,
                params: ParamScope::parse(src.parameters.as_ref(), spec)?,
            });
        }
        if sources
            .iter()
            .any(|s| s.end - s.start != sources[0].end - sources[0].start)
        {
            return Err(Error::config(format!(
                "slice {i}: all sources must have the same number of layers"
            )));
        }
        let slice_base = slice_base.filter(|_| uses_base);
        if let Some(b) = slice_base {
            if spec.base == BasePolicy::Required && !sources.iter().any(|s| s.model == b) {
                return Err(Error::config(format!(
                    "slice {i}: base_model `{}` is not among its sources",
                    models.list[b].reference
                )));
            }
        }
        slices.push(Slice {
            sources,
            params: ParamScope::parse(s.parameters.as_ref(), spec)?,
            base: slice_base,
        });
    }
    Ok(slices)
}

/// What every output tensor's planning shares.
struct TensorPlanner<'a> {
    models: &'a Models,
    method: &'static dyn Method,
    /// Parameter scopes outside the slices, innermost first (module, then top level).
    scopes: &'a [&'a ParamScope],
    compute_dtype: Option<Dtype>,
    out_dtype: Option<Dtype>,
    seed: u64,
    vocabulary: Option<&'a Vocabulary>,
    companions: &'a [Option<Checkpoint>],
}

impl TensorPlanner<'_> {
    /// Plans every tensor of `part`: its pre-layer tensors from the first slice, its layers slice
    /// by slice (renumbered), the rest from the last slice. Returns the layer count.
    fn plan_part(&self, part: &Part, tensors: &mut Vec<TensorTask>) -> Result<usize> {
        let (first, last) = (&part.slices[0], part.slices.last().expect("validated"));
        let module = part.module;
        let model = |slice: &Slice| &self.models.list[slice.sources[0].model];
        for name in module.names_at(model(first), Position::Pre) {
            tensors.push(self.plan(first, &name, &name, None, 0.0)?);
        }
        let mut layers_out = 0;
        for slice in &part.slices {
            let n = slice.sources[0].end - slice.sources[0].start;
            for offset in 0..n {
                // mergekit's gradient position: t = offset / (n − 1), or 1 for a one-layer slice.
                let t = if n > 1 {
                    offset as f64 / (n - 1) as f64
                } else {
                    1.0
                };
                let layer = Position::Layer(slice.sources[0].start + offset);
                for name in module.names_at(model(slice), layer) {
                    let out_name = arch::with_layer(&name, layers_out);
                    tensors.push(self.plan(slice, &out_name, &name, Some(offset), t)?);
                }
                layers_out += 1;
            }
        }
        for name in module.names_at(model(last), Position::Post) {
            tensors.push(self.plan(last, &name, &name, None, 0.0)?);
        }
        Ok(layers_out)
    }

    /// Plans output tensor `out_name` of `slice`, read as `reference_name` from the slice's first
    /// source (renumbered by `layer_offset` for the others), at gradient position `t`.
    fn plan(
        &self,
        slice: &Slice,
        out_name: &str,
        reference_name: &str,
        layer_offset: Option<usize>,
        t: f64,
    ) -> Result<TensorTask> {
        let TensorPlanner {
            models,
            method,
            scopes,
            compute_dtype,
            out_dtype,
            seed,
            vocabulary,
            companions,
        } = *self;
        let vocabulary = vocabulary.filter(|_| crate::vocab::is_vocabulary_tensor(reference_name));
        let spec = method.spec();
        let input_name = |s: &Source| match layer_offset {
            Some(offset) => arch::with_layer(reference_name, s.start + offset),
            None => reference_name.to_string(),
        };
        let reference = models.list[slice.sources[0].model]
            .source(reference_name)
            .expect("name listed by this model");
        if !reference.dtype.is_mergeable_float() {
            // Integer and bool tensors (e.g. position_ids) come from the base, else the first source.
            let donor = slice
                .base
                .and_then(|b| models.list[b].source(reference_name))
                .unwrap_or(reference);
            return Ok(TensorTask {
                name: out_name.to_string(),
                shape: donor.shape.clone(),
                dtype: donor.dtype,
                shard: 0,
                offset: 0,
                work: Work::Copy(donor),
            });
        }
        let mut inputs = Vec::new();
        for s in &slice.sources {
            let model = &models.list[s.model];
            let name = input_name(s);
            let source = model.source(&name).ok_or_else(|| {
                Error::tensor(
                    &name,
                    format!(
                        "missing from model `{}` (needed for output `{out_name}`)",
                        model.reference
                    ),
                )
            })?;
            if source.shape != reference.shape && vocabulary.is_none() {
                return Err(Error::tensor(
                    &name,
                    format!(
                        "shape {:?} in model `{}` differs from {:?} in `{}`",
                        source.shape,
                        model.reference,
                        reference.shape,
                        models.list[slice.sources[0].model].reference
                    ),
                ));
            }
            if !source.dtype.is_mergeable_float() {
                return Err(Error::tensor(
                    &name,
                    format!(
                        "unsupported dtype {} in model `{}` (F32, F16 and BF16 can be merged)",
                        source.dtype.safetensors_name(),
                        model.reference
                    ),
                ));
            }
            inputs.push(MergeInput {
                model: s.model,
                tensor: name,
                source,
            });
        }
        if let Some(vocabulary) = vocabulary {
            let stored: Vec<(usize, TensorSource)> =
                inputs.iter().map(|i| (i.model, i.source.clone())).collect();
            for (input, view) in inputs
                .iter_mut()
                .zip(vocabulary.permute(out_name, &stored)?)
            {
                input.source = view;
            }
        }
        let shape = inputs[0].source.shape.clone();
        let base = slice
            .base
            .and_then(|b| slice.sources.iter().position(|s| s.model == b));
        let input_params: Vec<InputParams> = slice
            .sources
            .iter()
            .zip(&inputs)
            .map(|(s, i)| InputParams {
                model: &models.list[s.model].reference,
                tensor: &i.tensor,
                is_base: Some(s.model) == slice.base,
                source: &s.params,
            })
            .collect();
        let all_scopes: Vec<&ParamScope> = std::iter::once(&slice.params)
            .chain(scopes.iter().copied())
            .collect();
        let params = params::resolve(spec, out_name, t, &all_scopes, &input_params)?;
        let dtype = out_dtype
            .or(compute_dtype)
            .unwrap_or_else(|| promoted(inputs.iter().map(|i| i.source.dtype)));
        let plain_copy = spec.name == "passthrough"
            && params.per_input[0].is_empty()
            && inputs[0].source.is_verbatim()
            && dtype == inputs[0].source.dtype
            && compute_dtype.is_none_or(|c| c == dtype);
        let work = if plain_copy {
            Work::Copy(inputs.swap_remove(0).source)
        } else {
            let rng_keys = inputs
                .iter()
                .map(|i| crate::rng::stream_key(seed, out_name, i.model))
                .collect();
            Work::Merge(MergeTask {
                models: inputs.iter().map(|i| i.model).collect(),
                companions: companion_inputs(&inputs, companions)?,
                inputs,
                base,
                params,
                rng_keys,
            })
        };
        Ok(TensorTask {
            name: out_name.to_string(),
            shape,
            dtype,
            shard: 0,
            offset: 0,
            work,
        })
    }
}

/// The companion tensor of every input: the same name and shape in its model's statistics
/// checkpoint.
fn companion_inputs(
    inputs: &[MergeInput],
    companions: &[Option<Checkpoint>],
) -> Result<Vec<MergeInput>> {
    if companions.iter().all(Option::is_none) {
        return Ok(Vec::new());
    }
    inputs
        .iter()
        .map(|input| {
            let stats = companions[input.model]
                .as_ref()
                .expect("every input model has one");
            let source = stats
                .source(&input.tensor)
                .filter(|s| s.shape == input.source.shape && s.dtype.is_mergeable_float())
                .ok_or_else(|| {
                    Error::tensor(
                        &input.tensor,
                        format!(
                            "statistics `{}` lack it, or hold it in another shape",
                            stats.reference
                        ),
                    )
                })?;
            Ok(MergeInput {
                model: input.model,
                tensor: input.tensor.clone(),
                source,
            })
        })
        .collect()
}

/// torch's promotion among float dtypes: equal stays, otherwise f16 with bf16 or anything with
/// f32 gives f32.
fn promoted(mut dtypes: impl Iterator<Item = Dtype>) -> Dtype {
    let first = dtypes.next().unwrap_or(Dtype::F32);
    dtypes.fold(first, |acc, d| if acc == d { acc } else { Dtype::F32 })
}

fn assign_shards(tensors: &mut [TensorTask], max_bytes: usize) -> Vec<Shard> {
    tensors.sort_by_cached_key(|t| arch::natural_key(&t.name));
    let sizes: Vec<usize> = tensors.iter().map(TensorTask::bytes).collect();
    let assignment = shards::assign(&sizes, max_bytes);
    let count = assignment.last().map_or(1, |s| s + 1);
    let mut shards: Vec<Shard> = (0..count)
        .map(|i| Shard {
            name: shards::shard_name(i, count),
            tensors: Vec::new(),
            data_bytes: 0,
        })
        .collect();
    for (i, &s) in assignment.iter().enumerate() {
        tensors[i].shard = s;
        shards[s].tensors.push(i);
    }
    for shard in &mut shards {
        let entries: Vec<(&str, Dtype, usize)> = shard
            .tensors
            .iter()
            .map(|&i| {
                (
                    tensors[i].name.as_str(),
                    tensors[i].dtype,
                    tensors[i].bytes(),
                )
            })
            .collect();
        let offsets = shards::layout(&entries);
        shard.data_bytes = entries.iter().map(|e| e.2).sum();
        for (&i, offset) in shard.tensors.iter().zip(offsets) {
            tensors[i].offset = offset;
        }
    }
    shards
}

/// The model whose tokenizer files are copied, and the output vocabulary if the config asks for
/// one (`tokenizer_source: union | base | MODEL`, or a `tokenizer:` block).
fn tokenizer_plan(
    loaded: &LoadedConfig,
    models: &mut Models,
    base: Option<usize>,
    slices: &[&Slice],
) -> Result<(usize, Option<Vocabulary>)> {
    let c = &loaded.config;
    let fallback = base.unwrap_or(slices[0].sources[0].model);
    let (source, key) = match (&c.tokenizer_source, &c.tokenizer) {
        (Some(s), _) => (Some(s), "tokenizer_source"),
        (None, Some(block)) => (block.source.as_ref(), "tokenizer.source"),
        (None, None) => return Ok((fallback, None)),
    };
    let source = match source.map(|s| (s, s.value.as_str())) {
        None | Some((_, "union")) => vocab::Source::Union,
        Some((s, "base")) => {
            vocab::Source::Model(base.ok_or_else(|| error_at(s, key, "`base` needs `base_model`"))?)
        }
        Some((s, _)) => vocab::Source::Model(models.open(s, key)?),
    };
    let block = c.tokenizer.as_ref();
    let mut tokens = BTreeMap::new();
    for (token, rule) in block.iter().flat_map(|b| b.tokens.iter().flatten()) {
        let key = format!("tokenizer.tokens.{token}.source");
        let mut open = |model: &str| models.open(&spanned_like(&rule.source, model), &key);
        let from = match &rule.source.value {
            config::TokenSource::Model(m) => vocab::RuleSource::Model(open(m)?),
            config::TokenSource::Kind(config::TokenSourceKind::Zero) => vocab::RuleSource::Zero,
            config::TokenSource::Kind(config::TokenSourceKind::ModelToken {
                model,
                token,
                token_id,
            }) => vocab::RuleSource::ModelToken {
                model: open(model)?,
                token: token.clone(),
                token_id: *token_id,
            },
        };
        tokens.insert(
            token.clone(),
            vocab::TokenRule {
                from,
                force: rule.force,
            },
        );
    }
    let spec = vocab::VocabularySpec {
        source,
        tokens,
        pad_to_multiple_of: block
            .and_then(|b| b.pad_to_multiple_of.as_ref())
            .map(|p| p.value),
    };
    let mut inputs: Vec<usize> = Vec::new();
    for s in slices.iter().flat_map(|s| s.sources.iter()) {
        if !inputs.contains(&s.model) {
            inputs.push(s.model);
        }
    }
    let vocabulary = Vocabulary::build(&spec, &models.list, &inputs, base)?;
    let donor = match source {
        vocab::Source::Model(m) => m,
        vocab::Source::Union => fallback,
    };
    Ok((donor, vocabulary))
}

/// A model reference that appears inside a larger config value, with that value's position.
fn spanned_like<T>(at: &Spanned<T>, value: &str) -> Spanned<String> {
    Spanned {
        value: value.to_string(),
        referenced: at.referenced,
        defined: at.defined,
    }
}

fn set_vocab_size(config: &mut serde_json::Value, rows: usize) {
    if let Some(text) = config
        .get_mut("text_config")
        .filter(|t| t.get("vocab_size").is_some())
    {
        text["vocab_size"] = rows.into();
    } else if let Some(obj) = config.as_object_mut() {
        obj.insert("vocab_size".into(), rows.into());
    }
}

fn output_config(donor: &serde_json::Value, dtype: Option<Dtype>) -> serde_json::Value {
    let mut config = donor.clone();
    if let Some(obj) = config.as_object_mut() {
        if let Some(d) = dtype {
            for key in ["torch_dtype", "dtype"] {
                if obj.contains_key(key) || key == "torch_dtype" {
                    obj.insert(key.to_string(), d.torch_name().into());
                }
            }
        }
    }
    config
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// mergekit's `chat_template`: `auto` (the most common template of the inputs), a built-in name,
/// or a literal Jinja template.
fn chat_template(value: &Spanned<String>, models: &[Checkpoint]) -> Result<String> {
    let v = value.value.as_str();
    match v {
        "chatml" => Ok(CHATML.to_string()),
        "auto" => {
            let mut templates: Vec<String> = models
                .iter()
                .filter_map(|m| {
                    crate::checkpoint::read_json(&m.dir.join("tokenizer_config.json")).ok()
                })
                .filter_map(|t| {
                    t.get("chat_template")
                        .and_then(|c| c.as_str())
                        .map(str::to_string)
                })
                .collect();
            templates.sort();
            let best = templates
                .iter()
                .max_by_key(|t| templates.iter().filter(|u| u == t).count());
            best.cloned().ok_or_else(|| {
                error_at(
                    value,
                    "chat_template",
                    "`auto`: no input model has a chat template",
                )
            })
        }
        literal if literal.len() >= 20 && literal.contains('{') => Ok(literal.to_string()),
        other => Err(error_at(
            value,
            "chat_template",
            format!("`{other}` is neither `auto`, `chatml` nor a Jinja template"),
        )),
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "method: {}", self.method.spec().name)?;
        for (i, m) in self.models.iter().enumerate() {
            let role = if Some(i) == self.base { " (base)" } else { "" };
            writeln!(f, "model {i}: {}{role}  [{}]", m.reference, m.dir.display())?;
        }
        writeln!(
            f,
            "tensors: {}  output bytes: {}  input bytes read: {}",
            self.tensors.len(),
            self.total_bytes(),
            self.input_bytes()
        )?;
        for (s, shard) in self.shards.iter().enumerate() {
            writeln!(
                f,
                "shard {s}: {} ({} tensors, {} bytes)",
                shard.name,
                shard.tensors.len(),
                shard.data_bytes
            )?;
        }
        for t in &self.tensors {
            let what = match &t.work {
                Work::Copy(src) => format!("copy {}", src.file.path.display()),
                Work::Merge(m) => {
                    let ins: Vec<String> = m
                        .inputs
                        .iter()
                        .map(|i| format!("{}:{}", i.model, i.tensor))
                        .collect();
                    let params: Vec<String> =
                        m.params
                            .global
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .chain(m.params.per_input.iter().enumerate().flat_map(|(i, p)| {
                                p.iter().map(move |(k, v)| format!("{k}[{i}]={v}"))
                            }))
                            .collect();
                    format!(
                        "{} ← {} {}",
                        self.method.spec().name,
                        ins.join(", "),
                        params.join(" ")
                    )
                }
            };
            writeln!(
                f,
                "  {} {:?} {} @shard{}+{}  {what}",
                t.name, t.shape, t.dtype, t.shard, t.offset
            )?;
        }
        Ok(())
    }
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("method", &self.method.spec().name)
            .field("models", &self.models.len())
            .field("tensors", &self.tensors.len())
            .field("shards", &self.shards.len())
            .finish()
    }
}
