//! What a tensor name says about the architecture: which layer it belongs to and, for the rest,
//! whether it comes before the layers (embeddings) or after them (final norm, heads). Inferred
//! from names, so any decoder or encoder in the Hugging Face layout works without a template.

/// `model.layers.12.mlp.up_proj.weight` → (`model.layers`, 12, `mlp.up_proj.weight`).
pub fn split_layer(name: &str) -> Option<(&str, usize, &str)> {
    let mut start = 0;
    for (i, c) in name.char_indices() {
        if c != '.' {
            continue;
        }
        if start > 0 {
            let digits = &name[start..i];
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                return Some((&name[..start - 1], digits.parse().ok()?, &name[i + 1..]));
            }
        }
        start = i + 1;
    }
    None
}

/// The name of the same tensor in layer `index`.
pub fn with_layer(name: &str, index: usize) -> String {
    match split_layer(name) {
        Some((prefix, _, suffix)) => format!("{prefix}.{index}.{suffix}"),
        None => name.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Position {
    /// Embeddings and their norms: taken from the first slice.
    Pre,
    Layer(usize),
    /// Final norm, heads, pooler: taken from the last slice.
    Post,
}

pub fn position(name: &str) -> Position {
    if let Some((_, index, _)) = split_layer(name) {
        return Position::Layer(index);
    }
    let lower = name.to_ascii_lowercase();
    if lower.contains("embed") || lower.contains("wte.") || lower.contains("wpe.") {
        Position::Pre
    } else {
        Position::Post
    }
}

/// Orders tensors as a reader expects: embeddings, layers by number, then the rest.
pub fn natural_key(name: &str) -> (Position, String) {
    let pos = position(name);
    let rest = match split_layer(name) {
        Some((prefix, _, suffix)) => format!("{prefix}.{suffix}"),
        None => name.to_string(),
    };
    (pos, rest)
}

/// Config keys that hold the layer count, in the order they are tried.
pub const LAYER_COUNT_KEYS: [&str; 4] = ["num_hidden_layers", "n_layer", "num_layers", "n_layers"];

/// Reads the layer count of a `config.json`, also under `text_config`.
pub fn layer_count_key(config: &serde_json::Value) -> Option<(&'static str, usize)> {
    LAYER_COUNT_KEYS.iter().find_map(|k| {
        config
            .get(*k)
            .and_then(|v| v.as_u64())
            .map(|n| (*k, n as usize))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_layer_names() {
        assert_eq!(
            split_layer("model.layers.12.mlp.up_proj.weight"),
            Some(("model.layers", 12, "mlp.up_proj.weight"))
        );
        assert_eq!(
            split_layer("transformer.h.0.attn.c_attn.bias"),
            Some(("transformer.h", 0, "attn.c_attn.bias"))
        );
        assert_eq!(
            split_layer("encoder.layer.3.output.dense.weight"),
            Some(("encoder.layer", 3, "output.dense.weight"))
        );
        assert_eq!(split_layer("model.embed_tokens.weight"), None);
        assert_eq!(split_layer("0.weight"), None);
        assert_eq!(
            with_layer("model.layers.2.self_attn.o_proj.weight", 17),
            "model.layers.17.self_attn.o_proj.weight"
        );
    }

    #[test]
    fn classifies_positions() {
        assert_eq!(position("model.embed_tokens.weight"), Position::Pre);
        assert_eq!(position("transformer.wte.weight"), Position::Pre);
        assert_eq!(position("embeddings.LayerNorm.weight"), Position::Pre);
        assert_eq!(position("lm_head.weight"), Position::Post);
        assert_eq!(position("model.norm.weight"), Position::Post);
        assert_eq!(position("pooler.dense.bias"), Position::Post);
        let mut names = vec![
            "lm_head.weight",
            "model.layers.10.a",
            "model.layers.2.a",
            "model.embed_tokens.weight",
        ];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            [
                "model.embed_tokens.weight",
                "model.layers.2.a",
                "model.layers.10.a",
                "lm_head.weight"
            ]
        );
    }
}
