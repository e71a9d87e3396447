//! The file as written: serde structs that mirror the TOML keys one to one. Every field is
//! optional and values that need a judgement (durations, words, addresses) stay raw and
//! spanned, so `validate` can apply defaults and point its errors at the exact value.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, Visitor};
use toml::Spanned;

pub(crate) type Text = Spanned<String>;
pub(crate) type TextList = Spanned<Vec<Spanned<String>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub global: Option<RawGlobal>,
    pub resolver: Option<RawResolver>,
    /// Only checked for shape here: services are deserialized one at a time from the parsed
    /// document so that toml's own errors inside one can be prefixed with its name.
    #[allow(dead_code)] // read via the document tree, kept so toml lists "service" as valid
    pub service: Option<Spanned<Vec<IgnoredAny>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGlobal {
    pub admin: Option<Text>,
    pub admin_socket: Option<Text>,
    pub admin_token_file: Option<Text>,
    pub log_format: Option<Spanned<Scalar>>,
    pub shutdown_grace: Option<Spanned<Scalar>>,
    pub access_log: Option<Text>,
    pub access_log_format: Option<Spanned<Scalar>>,
    pub workers: Option<Spanned<Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResolver {
    pub nameservers: Option<Vec<Text>>,
    pub timeout: Option<Spanned<Scalar>>,
    pub min_refresh: Option<Spanned<Scalar>>,
    pub max_refresh: Option<Spanned<Scalar>>,
    pub empty_hold: Option<Spanned<Scalar>>,
    pub family: Option<Spanned<Scalar>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub name: Option<Text>,
    pub listen: Option<TextList>,
    pub srv: Option<Text>,
    #[serde(rename = "static")]
    pub static_backends: Option<TextList>,
    pub balance: Option<Spanned<Scalar>>,
    pub hash_key: Option<Spanned<Scalar>>,
    pub connect_timeout: Option<Spanned<Scalar>>,
    pub idle_timeout: Option<Spanned<Scalar>>,
    pub tcp_keepalive: Option<Spanned<Scalar>>,
    pub connect_retries: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_source: Option<Spanned<i64>>,
    pub rate_per_source: Option<Spanned<Scalar>>,
    pub rate_per_source_burst: Option<Spanned<i64>>,
    pub allow: Option<Vec<Text>>,
    pub deny: Option<Vec<Text>>,
    pub send_proxy: Option<Spanned<Scalar>>,
    pub accept_proxy: Option<Spanned<Scalar>>,
    pub accept_proxy_timeout: Option<Spanned<Scalar>>,
    pub accept_proxy_from: Option<Vec<Text>>,
    pub health: Option<RawHealth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub base_ejection: Option<Spanned<Scalar>>,
    pub max_ejection: Option<Spanned<Scalar>>,
    pub max_ejected_percent: Option<Spanned<i64>>,
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
