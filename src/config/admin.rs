//! The admin endpoint's keys beyond its address: `admin_socket` (a unix socket path) and
//! `admin_token_file` (the bearer token, read here at load time, so `srvlb check` and a
//! reload refuse an empty or unreadable file with the key's file:line:col). The token is
//! kept out of `Debug` output and compared in constant time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::error::Problem;
use super::keys::GLOBAL;
use super::raw::Text;

/// Longest unix socket path Linux accepts (`sun_path` holds 108 bytes with the NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// The bearer token the admin endpoint requires, and the file it came from.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AdminToken {
    path: PathBuf,
    secret: Arc<[u8]>,
}

impl AdminToken {
    /// A token with `secret` as if read from `path`; for tests and callers that hold the
    /// secret already.
    pub(crate) fn new(path: impl Into<PathBuf>, secret: impl AsRef<[u8]>) -> AdminToken {
        AdminToken {
            path: path.into(),
            secret: Arc::from(secret.as_ref()),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Length of the secret in bytes (the plan shows it; the secret itself never).
    pub(crate) fn len(&self) -> usize {
        self.secret.len()
    }

    /// True when `presented` is the token. Constant time in the secret's content (the
    /// lengths are compared first, and a length is not a secret).
    pub(crate) fn accepts(&self, presented: &[u8]) -> bool {
        self.secret.ct_eq(presented).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminToken")
            .field("path", &self.path)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// `global.admin_socket`: a path short enough for a unix socket.
pub(crate) fn socket_path(text: &Text) -> Result<PathBuf, Problem> {
    let key = GLOBAL.admin_socket.path();
    let path = text.get_ref();
    if path.is_empty() {
        return Err(Problem::at(
            text.span(),
            format!("{key}: empty path; leave the key out for no unix socket"),
        ));
    }
    if path.len() > MAX_SOCKET_PATH {
        return Err(Problem::at(
            text.span(),
            format!(
                "{key}: the path is {} bytes long; a unix socket path has at most {MAX_SOCKET_PATH}",
                path.len()
            ),
        ));
    }
    Ok(PathBuf::from(path))
}

/// `global.admin_token_file`: reads the token. The file holds one line of visible ASCII
/// (a trailing newline is ignored, as `echo` writes it).
pub(crate) fn token_file(text: &Text) -> Result<AdminToken, Problem> {
    let key = GLOBAL.admin_token_file.path();
    let path = PathBuf::from(text.get_ref());
    let fail = |why: String| Problem::at(text.span(), format!("{key}: {why}"));
    if text.get_ref().is_empty() {
        return Err(fail(
            "empty path; leave the key out for no authentication".to_owned(),
        ));
    }
    let content =
        std::fs::read(&path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    let secret = content
        .strip_suffix(b"\n")
        .map(|s| s.strip_suffix(b"\r").unwrap_or(s))
        .unwrap_or(&content);
    if secret.is_empty() {
        return Err(fail(format!(
            "{} is empty; write the token into it (e.g. openssl rand -hex 32)",
            path.display()
        )));
    }
    if !secret.iter().all(u8::is_ascii_graphic) {
        return Err(fail(format!(
            "{} must hold one line of visible ASCII (no spaces or control bytes)",
            path.display()
        )));
    }
    Ok(AdminToken::new(path, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_compared_exactly_and_never_shown() {
        let token = AdminToken::new("/t", "s3cret");
        assert!(token.accepts(b"s3cret"));
        for wrong in [&b""[..], b"s3cre", b"s3cret ", b"S3CRET", b"x3cret"] {
            assert!(!token.accepts(wrong), "{wrong:?}");
        }
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
