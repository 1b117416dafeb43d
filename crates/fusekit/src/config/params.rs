//! Parameter values as mergekit reads them (`mergekit/config.py::evaluate_setting`):
//! - a scalar (number, bool or string);
//! - a list of numbers: a gradient, interpolated piecewise-linearly over the slice's layers at
//!   `t ∈ [0, 1]`; a list of other scalars selects the entry at `int(t·(len−1))`;
//! - a list of `{filter, value}` conditionals: the first whose filter is a substring of the tensor
//!   name (or is missing or `"*"`) wins, and its value may itself be a gradient. When none
//!   matches, the next scope down is asked.

use super::error_at;
use crate::error::Result;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;

pub type ParamMap = BTreeMap<String, Spanned<serde_json::Value>>;

#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Number(f64),
    Bool(bool),
    Text(String),
}

impl Scalar {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Number(x) => Some(*x),
            Scalar::Bool(b) => Some(*b as u8 as f64),
            Scalar::Text(t) => t.trim().parse().ok(),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            Scalar::Number(x) if *x == 0.0 || *x == 1.0 => Some(*x == 1.0),
            Scalar::Text(t) => match t.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" => Some(true),
                "false" | "no" | "off" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Number(x) => write!(f, "{x}"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Text(t) => write!(f, "{t:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Scalar(Scalar),
    List(Vec<Scalar>),
    Conditional(Vec<(Option<String>, ParamValue)>),
}

impl ParamValue {
    /// Parses the value of parameter `key`; errors name the key and its line.
    pub fn parse(key: &str, spanned: &Spanned<serde_json::Value>) -> Result<ParamValue> {
        Self::from_json(&spanned.value).map_err(|m| error_at(spanned, key, m))
    }

    fn from_json(value: &serde_json::Value) -> std::result::Result<ParamValue, String> {
        use serde_json::Value;
        match value {
            Value::Array(items) if items.iter().all(|i| i.is_object()) && !items.is_empty() => {
                items
                    .iter()
                    .map(Self::conditional)
                    .collect::<std::result::Result<_, _>>()
                    .map(ParamValue::Conditional)
            }
            Value::Array(items) => items
                .iter()
                .map(|i| {
                    scalar(i).ok_or_else(|| {
                        format!("list entries must be scalars or {{filter, value}} maps, got {i}")
                    })
                })
                .collect::<std::result::Result<_, _>>()
                .map(ParamValue::List),
            Value::Object(_) => Self::conditional(value).map(|c| ParamValue::Conditional(vec![c])),
            other => scalar(other)
                .map(ParamValue::Scalar)
                .ok_or_else(|| format!("unsupported value {other}")),
        }
    }

    fn conditional(
        value: &serde_json::Value,
    ) -> std::result::Result<(Option<String>, ParamValue), String> {
        let map = value.as_object().ok_or("expected a {filter, value} map")?;
        if let Some(k) = map.keys().find(|k| *k != "filter" && *k != "value") {
            return Err(format!(
                "unknown key `{k}` in a conditional (expected `filter` and `value`)"
            ));
        }
        let filter = match map.get("filter") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(format!("`filter` must be a string, got {other}")),
        };
        let inner = map.get("value").ok_or("a conditional needs a `value`")?;
        Ok((filter, Self::from_json(inner)?))
    }

    /// The value for `tensor` at gradient position `t`, or `None` when no conditional matches.
    pub fn evaluate(&self, tensor: &str, t: f64) -> Option<Scalar> {
        match self {
            ParamValue::Scalar(s) => Some(s.clone()),
            ParamValue::List(items) if items.is_empty() => None,
            ParamValue::List(items) => {
                let numbers: Option<Vec<f64>> = items
                    .iter()
                    .map(|s| match s {
                        Scalar::Number(x) => Some(*x),
                        _ => None,
                    })
                    .collect();
                match numbers {
                    Some(values) => Some(Scalar::Number(interpolate(&values, t))),
                    None => Some(items[(t * (items.len() - 1) as f64) as usize].clone()),
                }
            }
            ParamValue::Conditional(conds) => {
                conds.iter().find_map(|(filter, value)| match filter {
                    None => value.evaluate(tensor, t),
                    Some(f) if f == "*" || tensor.contains(f.as_str()) => value.evaluate(tensor, t),
                    Some(_) => None,
                })
            }
        }
    }
}

/// mergekit's gradient: `scaled = t·(len−1)`, lerp between the two nearest entries.
pub fn interpolate(values: &[f64], t: f64) -> f64 {
    let scaled = t * (values.len() - 1) as f64;
    let i0 = scaled as usize;
    let i1 = (i0 + 1).min(values.len() - 1);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * values[i0] + frac * values[i1]
}

fn scalar(value: &serde_json::Value) -> Option<Scalar> {
    match value {
        serde_json::Value::Number(n) => n.as_f64().map(Scalar::Number),
        serde_json::Value::Bool(b) => Some(Scalar::Bool(*b)),
        serde_json::Value::String(s) => Some(Scalar::Text(s.clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn value(v: serde_json::Value) -> ParamValue {
        ParamValue::from_json(&v).unwrap()
    }

    #[test]
    fn gradients_interpolate_like_mergekit() {
        let g = value(json!([0.0, 0.5, 0.3, 0.7, 1.0]));
        assert_eq!(g.evaluate("x", 0.0), Some(Scalar::Number(0.0)));
        assert_eq!(g.evaluate("x", 1.0), Some(Scalar::Number(1.0)));
        // t = 0.3 → scaled 1.2 → 0.8·0.5 + 0.2·0.3
        let Some(Scalar::Number(x)) = g.evaluate("x", 0.3) else {
            panic!()
        };
        assert!((x - 0.46).abs() < 1e-12);
        let steps = value(json!(["a", "b", "c"]));
        assert_eq!(steps.evaluate("x", 0.99), Some(Scalar::Text("b".into())));
    }

    #[test]
    fn first_matching_filter_wins_with_fallback() {
        let v = value(json!([
            {"filter": "self_attn", "value": [0.0, 1.0]},
            {"filter": "mlp", "value": 0.25},
            {"value": 0.5}
        ]));
        assert_eq!(
            v.evaluate("model.layers.1.self_attn.q_proj.weight", 0.5),
            Some(Scalar::Number(0.5))
        );
        assert_eq!(
            v.evaluate("model.layers.1.mlp.up_proj.weight", 0.5),
            Some(Scalar::Number(0.25))
        );
        assert_eq!(
            v.evaluate("model.norm.weight", 0.0),
            Some(Scalar::Number(0.5))
        );
        let no_fallback = value(json!([{"filter": "mlp", "value": 1.0}]));
        assert_eq!(no_fallback.evaluate("model.norm.weight", 0.0), None);
        let star = value(json!([{"filter": "*", "value": 2.0}]));
        assert_eq!(star.evaluate("anything", 0.0), Some(Scalar::Number(2.0)));
    }

    #[test]
    fn bad_conditionals_are_explained() {
        assert!(
            ParamValue::from_json(&json!([{"filtr": "mlp", "value": 1}]))
                .unwrap_err()
                .contains("filtr")
        );
        assert!(ParamValue::from_json(&json!([{"filter": "mlp"}]))
            .unwrap_err()
            .contains("value"));
    }
}
