//! The parts of multi-module models (mergekit's `modules:`), e.g. a vision tower, a projector and
//! a text decoder side by side. Each part is merged with its own `models` or `slices` and
//! parameters; its tensors are recognised by name prefix (the layouts of LLaVA, Mistral 3,
//! Gemma 3 and Qwen2-VL in `transformers`), and the text decoder owns what no other part claims.

use crate::arch::{self, Position};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// A known part: the name mergekit gives it, the prefixes of its tensors, and the config keys of
/// its layer count (`None`: a part without repeated layers).
struct Kind {
    name: &'static str,
    prefixes: &'static [&'static str],
    layer_keys: Option<&'static [&'static str]>,
}

const KINDS: &[Kind] = &[
    Kind {
        name: "vision_tower",
        prefixes: &[
            "vision_tower.",
            "model.vision_tower.",
            "visual.blocks.",
            "visual.patch_embed.",
        ],
        layer_keys: Some(&["vision_config.num_hidden_layers", "vision_config.depth"]),
    },
    Kind {
        name: "multi_modal_projector",
        prefixes: &[
            "multi_modal_projector.",
            "model.multi_modal_projector.",
            "visual.merger.",
        ],
        layer_keys: None,
    },
    Kind {
        name: "text_decoder",
        prefixes: &[],
        layer_keys: Some(&["text_config.num_hidden_layers", "num_hidden_layers"]),
    },
];

/// The tensors one part of the merge covers: the whole model, or one module of it.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    kind: Option<&'static str>,
}

impl Module {
    pub const WHOLE: Module = Module { kind: None };

    pub fn named(name: &str) -> Result<Module> {
        let kind = KINDS.iter().find(|k| k.name == name).ok_or_else(|| {
            let known: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
            Error::config(format!(
                "unknown module `{name}` (known: {})",
                known.join(", ")
            ))
        })?;
        Ok(Module {
            kind: Some(kind.name),
        })
    }

    fn kind(&self) -> Option<&'static Kind> {
        self.kind.and_then(|k| KINDS.iter().find(|x| x.name == k))
    }

    pub fn is_whole(&self) -> bool {
        self.kind.is_none()
    }

    pub fn name(&self) -> &'static str {
        self.kind.unwrap_or("model")
    }

    /// The module a tensor belongs to.
    pub fn of(tensor: &str) -> Module {
        let kind = KINDS
            .iter()
            .find(|k| k.prefixes.iter().any(|p| tensor.starts_with(p)))
            .map_or("text_decoder", |k| k.name);
        Module { kind: Some(kind) }
    }

    pub fn owns(&self, tensor: &str) -> bool {
        self.kind.is_none_or(|k| Module::of(tensor).kind == Some(k))
    }

    /// A part's tensors are all "before the layers" when it has no repeated layers.
    pub fn position(&self, tensor: &str) -> Position {
        match self.kind() {
            Some(k) if k.layer_keys.is_none() => Position::Pre,
            _ => arch::position(tensor),
        }
    }

    /// The part's tensors of `model` at `position`, in the model's order.
    pub fn names_at(&self, model: &Checkpoint, position: Position) -> Vec<String> {
        model
            .tensor_names()
            .filter(|n| self.owns(n) && self.position(n) == position)
            .map(str::to_string)
            .collect()
    }

    /// The part's layer count in `model`: its config key, else the highest layer index + 1.
    pub fn layer_count(&self, model: &Checkpoint) -> usize {
        let Some(kind) = self.kind() else {
            return arch::layer_count_key(&model.config)
                .map(|(_, n)| n)
                .unwrap_or_else(|| self.counted_layers(model));
        };
        let Some(keys) = kind.layer_keys else {
            return 0;
        };
        keys.iter()
            .find_map(|k| config_path(&model.config, k).and_then(|v| v.as_u64()))
            .map_or_else(|| self.counted_layers(model), |n| n as usize)
    }

    fn counted_layers(&self, model: &Checkpoint) -> usize {
        model
            .tensor_names()
            .filter(|n| self.owns(n))
            .filter_map(|n| match self.position(n) {
                Position::Layer(i) => Some(i + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Writes the part's layer count into the output config.
    pub fn set_layer_count(&self, config: &mut serde_json::Value, layers: usize) {
        let keys: &[&str] = match self.kind() {
            None => {
                if let Some((key, _)) = arch::layer_count_key(config) {
                    config[key] = layers.into();
                }
                return;
            }
            Some(k) => k.layer_keys.unwrap_or(&[]),
        };
        if let Some(key) = keys.iter().find(|k| config_path(config, k).is_some()) {
            let mut at = &mut *config;
            for part in key.split('.') {
                at = &mut at[part];
            }
            *at = layers.into();
        }
    }
}

fn config_path<'a>(config: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(config, |v, k| v.get(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_belong_to_one_module() {
        let cases = [
            (
                "vision_tower.transformer.layers.0.attention.q_proj.weight",
                "vision_tower",
            ),
            (
                "multi_modal_projector.linear_1.weight",
                "multi_modal_projector",
            ),
            (
                "language_model.model.layers.3.mlp.up_proj.weight",
                "text_decoder",
            ),
            ("visual.merger.mlp.0.weight", "multi_modal_projector"),
            ("visual.blocks.2.attn.qkv.weight", "vision_tower"),
            ("model.layers.0.self_attn.q_proj.weight", "text_decoder"),
        ];
        for (tensor, module) in cases {
            assert_eq!(Module::of(tensor).name(), module, "{tensor}");
            assert!(Module::named(module).unwrap().owns(tensor));
            assert!(Module::WHOLE.owns(tensor));
        }
        let projector = Module::named("multi_modal_projector").unwrap();
        assert_eq!(
            projector.position("visual.merger.mlp.0.weight"),
            Position::Pre
        );
        assert!(Module::named("audio_tower").is_err());
    }
}
