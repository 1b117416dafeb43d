//! JSON objects read strictly: `serde_json` keeps the last of two equal keys without a word,
//! which would let a hostile header or index name one tensor twice and have either one win.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use std::collections::HashSet;
use std::marker::PhantomData;

/// A JSON object whose keys are unique, in file order.
#[derive(Debug)]
pub struct UniqueObject<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueObject<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(UniqueVisitor(PhantomData))
    }
}

struct UniqueVisitor<V>(PhantomData<V>);

impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueVisitor<V> {
    type Value = UniqueObject<V>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("`{key}` appears twice")));
            }
            entries.push((key, map.next_value()?));
        }
        Ok(UniqueObject(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_and_order_is_kept() {
        let ok: UniqueObject<u32> = serde_json::from_str(r#"{"b": 1, "a": 2}"#).unwrap();
        assert_eq!(ok.0, vec![("b".into(), 1), ("a".into(), 2)]);
        let err = serde_json::from_str::<UniqueObject<u32>>(r#"{"a": 1, "a": 2}"#).unwrap_err();
        assert!(err.to_string().contains("`a` appears twice"), "{err}");
    }
}
