//! Fields that hold JSON *inside a JSON string* (double encoded), as hcsshim's `anyInString`:
//! `ContainerConfig`, `ProcessParameters`, GetProperties `Query` / `Properties`, notification
//! `ResultInfo`.

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value of type `T` carried on the wire as a string holding its JSON encoding.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JsonString<T>(pub T);

impl<T: Serialize> Serialize for JsonString<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(&self.0).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for JsonString<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text)
            .map(JsonString)
            .map_err(|e| D::Error::custom(format_args!("inner JSON string: {e}")))
    }
}

#[cfg(test)]
impl<T: proptest::arbitrary::Arbitrary + 'static> proptest::arbitrary::Arbitrary for JsonString<T> {
    type Parameters = T::Parameters;
    type Strategy = proptest::strategy::Map<T::Strategy, fn(T) -> Self>;
    fn arbitrary_with(p: Self::Parameters) -> Self::Strategy {
        use proptest::strategy::Strategy;
        T::arbitrary_with(p).prop_map(JsonString)
    }
}

/// For optional double-encoded fields: absent, `null` and `""` all mean "none".
pub mod optional {
    use super::*;

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<JsonString<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<JsonString<T>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) if text.is_empty() => Ok(None),
            Some(text) => serde_json::from_str(&text)
                .map(|v| Some(JsonString(v)))
                .map_err(|e| D::Error::custom(format_args!("inner JSON string: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Outer {
        #[serde(rename = "Inner")]
        inner: JsonString<Vec<u32>>,
    }

    #[test]
    fn double_encoding() {
        let o = Outer {
            inner: JsonString(vec![1, 2]),
        };
        let text = serde_json::to_string(&o).unwrap();
        assert_eq!(text, r#"{"Inner":"[1,2]"}"#);
        assert_eq!(serde_json::from_str::<Outer>(&text).unwrap(), o);
        // The inner value must itself be valid JSON of the right shape.
        assert!(serde_json::from_str::<Outer>(r#"{"Inner":"[1,"}"#).is_err());
        assert!(serde_json::from_str::<Outer>(r#"{"Inner":[1,2]}"#).is_err());
    }
}
