//! Resolution of method parameters for one output tensor, with mergekit's precedence (highest
//! first): slice source (per model) → slice → top level. Global parameters skip the source scope
//! and are matched against the output tensor name; per-model ones against the input tensor name.

use crate::config::{error_at, ParamMap, ParamValue, Scalar};
use crate::error::{Error, Result};
use crate::methods::{Default, MethodSpec, ParamSpec, ResolvedParams, Scope};
use std::collections::BTreeMap;

/// A parameter map parsed once, keeping each value's line for errors.
#[derive(Debug, Default, Clone)]
pub struct ParamScope {
    values: BTreeMap<String, (ParamValue, u64)>,
}

impl ParamScope {
    /// Parses `map`, refusing names the method does not know.
    pub fn parse(map: Option<&ParamMap>, spec: &MethodSpec) -> Result<ParamScope> {
        let mut values = BTreeMap::new();
        for (key, spanned) in map.into_iter().flatten() {
            if !spec.params.iter().any(|p| p.name == key) {
                let known: Vec<&str> = spec.params.iter().map(|p| p.name).collect();
                return Err(error_at(
                    spanned,
                    key,
                    format!(
                        "`{}` has no parameter `{key}` (it has: {})",
                        spec.name,
                        known.join(", ")
                    ),
                ));
            }
            values.insert(
                key.clone(),
                (ParamValue::parse(key, spanned)?, spanned.referenced.line()),
            );
        }
        Ok(ParamScope { values })
    }
}

/// One input of a tensor as parameter resolution sees it.
pub struct InputParams<'a> {
    pub model: &'a str,
    pub tensor: &'a str,
    pub is_base: bool,
    /// The source scope of this input (per-model parameters).
    pub source: &'a ParamScope,
}

pub fn resolve(
    spec: &MethodSpec,
    output: &str,
    t: f64,
    scopes: &[&ParamScope],
    inputs: &[InputParams],
) -> Result<ResolvedParams> {
    let mut resolved = ResolvedParams::default();
    for p in spec.params.iter().filter(|p| p.scope == Scope::Global) {
        if let Some(v) = lookup(p, output, t, scopes.iter().copied(), output)? {
            resolved.global.insert(p.name, v);
        } else if let Some(v) = default_value(p) {
            resolved.global.insert(p.name, v);
        } else {
            return Err(Error::tensor(
                output,
                format!("`{}` needs parameter `{}`", spec.name, p.name),
            ));
        }
    }
    for input in inputs {
        let mut map = BTreeMap::new();
        for p in spec.params.iter().filter(|p| p.scope != Scope::Global) {
            if p.scope == Scope::NonBase && input.is_base {
                continue;
            }
            let chain = std::iter::once(input.source).chain(scopes.iter().copied());
            if let Some(v) = lookup(p, input.tensor, t, chain, output)? {
                map.insert(p.name, v);
            } else if let Some(v) = default_value(p) {
                map.insert(p.name, v);
            } else if p.default.is_none() {
                return Err(Error::tensor(
                    output,
                    format!(
                        "model `{}` needs parameter `{}` for `{}`",
                        input.model, p.name, spec.name
                    ),
                ));
            }
        }
        resolved.per_input.push(map);
    }
    Ok(resolved)
}

fn lookup<'a>(
    p: &ParamSpec,
    tensor: &str,
    t: f64,
    chain: impl Iterator<Item = &'a ParamScope>,
    output: &str,
) -> Result<Option<Scalar>> {
    for scope in chain {
        if let Some((value, line)) = scope.values.get(p.name) {
            if let Some(v) = value.evaluate(tensor, t) {
                if let Some(why) = p.ty.refuse(&v) {
                    return Err(Error::config(format!(
                        "`{}` (line {line}): {why} (tensor `{output}`)",
                        p.name
                    )));
                }
                return Ok(Some(v));
            }
        }
    }
    Ok(None)
}

fn default_value(p: &ParamSpec) -> Option<Scalar> {
    match p.default? {
        Default::Float(x) => Some(Scalar::Number(x)),
        Default::Bool(b) => Some(Scalar::Bool(b)),
        Default::Unset => None,
    }
}
