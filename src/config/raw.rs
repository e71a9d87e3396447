//! The file as written: its top-level tables and the [`Scalar`] that durations and words
//! are read as. The tables' own structs come from their key declarations (`keys.rs`); every
//! field is optional and values that need a judgement (durations, words, addresses) stay raw
//! and spanned, so `validate` can apply defaults and point its errors at the exact value.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, Visitor};
use toml::Spanned;

pub(crate) use super::keys::{RawGlobal, RawHealth, RawResolver, RawService};

pub(crate) type Text = Spanned<String>;
pub(crate) type TextList = Spanned<Vec<Spanned<String>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub(crate) global: Option<RawGlobal>,
    pub(crate) resolver: Option<RawResolver>,
    /// Only checked for shape here: services are deserialized one at a time from the parsed
    /// document so that toml's own errors inside one can be prefixed with its name.
    #[allow(dead_code)] // read via the document tree, kept so toml lists "service" as valid
    pub(crate) service: Option<Spanned<Vec<IgnoredAny>>>,
}

/// Any TOML scalar. Durations and keywords are read this way so that `timeout = 5` or
/// `balance = 1` get our message ("expected a duration like ...") instead of serde's
/// "invalid type: integer, expected a string".
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
}

impl fmt::Display for Scalar {
    /// Shows the value as it would appear in the file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Text(text) => write!(f, "{text:?}"),
            Scalar::Integer(n) => write!(f, "{n}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Boolean(b) => write!(f, "{b}"),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Integer(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                // TOML integers are i64; saturate instead of failing, the value is only shown.
                Ok(Scalar::Integer(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Boolean(v))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}
