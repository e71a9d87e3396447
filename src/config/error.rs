//! Config errors and the byte-offset to line:column translation they need. Validation code
//! produces a [`Problem`] (a span and a message); only `Config::parse` knows the file name and
//! text, so it alone turns a `Problem` into a [`ConfigError`].

use std::ops::Range;
use std::path::PathBuf;

use super::keys;

/// Why a configuration was rejected. `Display` is what `srvlb check` and the reload log print.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A problem at a known place in the file; `line` and `column` are 1-based and the column
    /// counts characters, not bytes, so editors jump to the right spot.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A problem of the file as a whole, which has no single place (e.g. no service at all).
    #[error("{origin}: {message}")]
    Incomplete { origin: String, message: String },
}

impl ConfigError {
    /// `(line, column)` when the error points into the file.
    pub fn location(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
            _ => None,
        }
    }
}

/// A validation failure before it is tied to a file: where (byte span, if known) and what.
#[derive(Debug)]
pub(crate) struct Problem {
    pub(crate) span: Option<Range<usize>>,
    pub(crate) message: String,
}

impl Problem {
    pub(crate) fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Problem {
            span: Some(span),
            message: message.into(),
        }
    }

    pub(crate) fn whole_file(message: impl Into<String>) -> Self {
        Problem {
            span: None,
            message: message.into(),
        }
    }

    /// Keeps toml's own span (unknown keys, wrong types, syntax) and its message, which
    /// already names the key and, for unknown keys, the valid ones; an unknown key also gets
    /// a "did you mean" or the table it belongs in.
    pub(crate) fn from_toml(error: &toml::de::Error, prefix: &str) -> Self {
        // toml messages may span several lines; the first is the summary we want.
        let mut message = error.message().trim().replace('\n', "; ");
        if let Some(hint) = unknown_field_hint(&message) {
            message = format!("{message}; {hint}");
        }
        Problem {
            span: error.span(),
            message: format!("{prefix}{message}"),
        }
    }

    pub(crate) fn into_error(self, origin: &str, text: &str) -> ConfigError {
        match self.span {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                ConfigError::Invalid {
                    origin: origin.to_string(),
                    line,
                    column,
                    message: self.message,
                }
            }
            None => ConfigError::Incomplete {
                origin: origin.to_string(),
                message: self.message,
            },
        }
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`", a hint from the key
/// declarations (see [`keys::unknown_key_hint`]).
fn unknown_field_hint(message: &str) -> Option<String> {
    let (unknown, rest) = message.strip_prefix("unknown field `")?.split_once('`')?;
    // The accepted names are every other piece between backticks.
    let accepted: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    keys::unknown_key_hint(unknown, &accepted)
}

/// 1-based line and character column of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    // A span should always start on a character boundary; step back rather than panic if not.
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}
