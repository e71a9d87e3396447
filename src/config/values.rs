//! Checks of single values: durations, integers, keywords, addresses, networks and DNS
//! names. Each returns the typed value or a [`Problem`] pointing at the value as written;
//! the generic kinds take their bounds and default from the key's declaration (`keys.rs`).
//! `validate` composes them and adds the rules that relate several values.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::duration::{DURATION_HINT, format_duration, parse_duration};
use super::error::Problem;
use super::keys::{DefaultValue, Key, Keyword, Kind};
use super::raw::{Scalar, Text, TextList};

/// The value as written, or the key's declared default in its place (at no span: a default
/// that failed its own check would be a bug, and `defaults_are_applied` pins them all).
fn given(key: &Key, value: Option<&Spanned<Scalar>>) -> Result<(Scalar, Range<usize>), Problem> {
    match value {
        Some(value) => Ok((value.get_ref().clone(), value.span())),
        None => key
            .default
            .scalar()
            .map(|scalar| (scalar, 0..0))
            .ok_or_else(|| undeclared(key, "a default")),
    }
}

/// A key used with a check its declaration does not provide for: a bug in srvlb, reported
/// as an error of the file rather than a panic.
pub(crate) fn undeclared(key: &Key, what: &str) -> Problem {
    Problem::whole_file(format!(
        "{}: srvlb's declaration of this key has no {what} (a bug; please report it)",
        key.path()
    ))
}

/// A [`Kind::Duration`] key, written or defaulted.
pub(crate) fn duration(
    key: &Key,
    value: Option<&Spanned<Scalar>>,
    p: &str,
) -> Result<Duration, Problem> {
    let Kind::Duration { positive } = key.kind else {
        return Err(undeclared(key, "duration kind"));
    };
    let (scalar, span) = given(key, value)?;
    let duration = parse_scalar_duration(&scalar, span.clone(), p, key)?;
    if positive && duration.is_zero() {
        return Err(Problem::at(
            span,
            format!("{p}{} must be greater than zero", key.path()),
        ));
    }
    Ok(duration)
}

fn parse_scalar_duration(
    scalar: &Scalar,
    span: Range<usize>,
    p: &str,
    key: &Key,
) -> Result<Duration, Problem> {
    let reason = match scalar {
        Scalar::Text(text) => match parse_duration(text) {
            Ok(duration) => return Ok(duration),
            Err(reason) => reason,
        },
        number @ (Scalar::Integer(_) | Scalar::Float(_)) => format!("{number} has no unit"),
        other => format!("{other} is not a duration"),
    };
    Err(Problem::at(
        span,
        format!("{p}{}: {reason}; {DURATION_HINT}", key.path()),
    ))
}

/// A [`Kind::DurationOrSwitch`] key: `Some(interval)`, or `None` for `false`; `true` is the
/// declared default.
pub(crate) fn duration_or_switch(
    key: &Key,
    value: Option<&Spanned<Scalar>>,
    p: &str,
) -> Result<Option<Duration>, Problem> {
    let Kind::DurationOrSwitch { min_secs, max_secs } = key.kind else {
        return Err(undeclared(key, "duration-or-switch kind"));
    };
    let (scalar, span) = match value.map(Spanned::get_ref) {
        Some(Scalar::Boolean(false)) => return Ok(None),
        None | Some(Scalar::Boolean(true)) => given(key, None)?,
        Some(_) => given(key, value)?,
    };
    let interval = parse_scalar_duration(&scalar, span.clone(), p, key)?;
    if interval < Duration::from_secs(min_secs) || interval > Duration::from_secs(max_secs) {
        return Err(Problem::at(
            span,
            format!(
                "{p}{}: must be between {min_secs}s and {max_secs}s, or false to turn it off",
                key.path()
            ),
        ));
    }
    Ok(Some(interval))
}

/// A [`Kind::Bool`] key, written or defaulted.
pub(crate) fn boolean(
    key: &Key,
    value: Option<&Spanned<Scalar>>,
    p: &str,
) -> Result<bool, Problem> {
    match given(key, value)? {
        (Scalar::Boolean(b), _) => Ok(b),
        (other, span) => Err(Problem::at(
            span,
            format!("{p}{}: expected true or false, not {other}", key.path()),
        )),
    }
}

/// Checks `low <= high`; blames `low` when it was written, else `high` (a default cannot be
/// at fault, and both defaults are ordered).
pub(crate) fn ordered(
    low: (&Key, Duration, Option<&Spanned<Scalar>>),
    high: (&Key, Duration, Option<&Spanned<Scalar>>),
    p: &str,
) -> Result<(), Problem> {
    let (low_key, low_value, low_raw) = low;
    let (high_key, high_value, high_raw) = high;
    if low_value <= high_value {
        return Ok(());
    }
    let shown = |value: Duration, raw: Option<&Spanned<Scalar>>| match raw {
        Some(_) => format_duration(value),
        None => format!("{}, the default", format_duration(value)),
    };
    let span = low_raw.or(high_raw).map_or(0..0, |v| v.span());
    Err(Problem::at(
        span,
        format!(
            "{p}{} ({}) must not be longer than {} ({})",
            low_key.path(),
            shown(low_value, low_raw),
            high_key.path(),
            shown(high_value, high_raw)
        ),
    ))
}

/// A [`Kind::Integer`] key, written or defaulted.
pub(crate) fn integer<T: TryFrom<i64>>(
    key: &Key,
    value: Option<&Spanned<i64>>,
    p: &str,
) -> Result<T, Problem> {
    match (value, &key.default) {
        (Some(value), _) => bounded(key, *value.get_ref(), value.span(), p),
        (None, DefaultValue::Integer(n)) => bounded(key, *n, 0..0, p),
        (None, _) => Err(undeclared(key, "integer default")),
    }
}

/// A [`Kind::Integer`] key whose absence means "no limit".
pub(crate) fn optional_integer<T: TryFrom<i64>>(
    key: &Key,
    value: Option<&Spanned<i64>>,
    p: &str,
) -> Result<Option<T>, Problem> {
    value
        .map(|value| bounded(key, *value.get_ref(), value.span(), p))
        .transpose()
}

/// `n` within the key's declared range and the target type's.
fn bounded<T: TryFrom<i64>>(key: &Key, n: i64, span: Range<usize>, p: &str) -> Result<T, Problem> {
    let Kind::Integer { min, max } = key.kind else {
        return Err(undeclared(key, "integer kind"));
    };
    let path = key.path();
    if n < min {
        return Err(Problem::at(
            span,
            format!("{p}{path} must be at least {min}, not {n}"),
        ));
    }
    if let Some(max) = max.filter(|max| n > *max) {
        return Err(Problem::at(
            span,
            format!("{p}{path} must be at most {max}, not {n}"),
        ));
    }
    T::try_from(n).map_err(|_| Problem::at(span, format!("{p}{path} {n} is too large")))
}

/// A [`Kind::Words`] key, written or defaulted.
pub(crate) fn keyword<T: Keyword>(
    key: &Key,
    value: Option<&Spanned<Scalar>>,
    p: &str,
) -> Result<T, Problem> {
    let (scalar, span) = given(key, value)?;
    word(key, &scalar, span, p)
}

/// A [`Kind::Words`] key whose absence means "off".
pub(crate) fn optional_keyword<T: Keyword>(
    key: &Key,
    value: Option<&Spanned<Scalar>>,
    p: &str,
) -> Result<Option<T>, Problem> {
    value
        .map(|value| word(key, value.get_ref(), value.span(), p))
        .transpose()
}

fn word<T: Keyword>(key: &Key, scalar: &Scalar, span: Range<usize>, p: &str) -> Result<T, Problem> {
    if let Scalar::Text(text) = scalar {
        if let Some(i) = T::WORDS.iter().position(|w| w == text) {
            return T::VALUES
                .get(i)
                .copied()
                .ok_or_else(|| undeclared(key, "value for a word"));
        }
    }
    let allowed = either(T::WORDS.iter().map(|w| format!("{w:?}")));
    Err(Problem::at(
        span,
        format!("{p}{} must be {allowed}, not {scalar}", key.path()),
    ))
}

/// `"a"`, `"a" or "b"`, `"a", "b" or "c"`: the choices as a sentence says them.
pub(crate) fn either(choices: impl IntoIterator<Item = String>) -> String {
    let choices: Vec<String> = choices.into_iter().collect();
    match choices.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Parses a list of backend or listener addresses, rejecting repeats within the list.
pub(crate) fn addresses(list: &TextList, p: &str, what: &str) -> Result<Vec<SocketAddr>, Problem> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for text in list.get_ref() {
        let addr = socket_addr(text, p, what)?;
        if out.contains(&addr) {
            return Err(Problem::at(
                text.span(),
                format!("{p}{what} {addr} is listed twice"),
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

/// An `IP:port` with a non-zero port. Host names are refused on purpose: config never
/// resolves, and a name that changes address belongs in DNS (srv), not here.
pub(crate) fn socket_addr(text: &Text, p: &str, what: &str) -> Result<SocketAddr, Problem> {
    let value = text.get_ref().as_str();
    let message = match value.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => return Ok(addr),
        Ok(_) => format!("{p}{what} {value:?}: port 0 is not allowed"),
        Err(_) => match value.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => format!("{p}{what} {value:?} has no port; write \"{ip}:PORT\""),
            Ok(IpAddr::V6(ip)) => {
                format!("{p}{what} {value:?} has no port; write \"[{ip}]:PORT\"")
            }
            Err(_) => format!(
                "{p}{what} {value:?} is not an IP:port address like \"127.0.0.1:5432\" or \
                 \"[::1]:5432\" (host names are not resolved here; use srv)"
            ),
        },
    };
    Err(Problem::at(text.span(), message))
}

/// A nameserver of `key` ([`Kind::Nameservers`]): "ip:port", "[v6]:port", or a bare "ip" /
/// "[v6]" meaning port 53.
pub(crate) fn nameserver(key: &Key, text: &Text) -> Result<SocketAddr, Problem> {
    let value = text.get_ref().as_str();
    if let Ok(addr) = value.parse::<SocketAddr>() {
        if addr.port() != 0 {
            return Ok(addr);
        }
    }
    let bare = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(Problem::at(
        text.span(),
        format!(
            "{}: {value:?} is not an IP address or IP:port (like \"127.0.0.1:8600\"; \
             port 53 if omitted, and no host names)",
            key.path()
        ),
    ))
}

/// A [`Kind::Networks`] key (absent: empty).
pub(crate) fn networks(key: &Key, list: Option<&[Text]>, p: &str) -> Result<Vec<IpNet>, Problem> {
    let key = key.path();
    let mut out = Vec::new();
    for text in list.unwrap_or_default() {
        let value = text.get_ref().as_str();
        let net = match value.parse::<IpNet>() {
            // Host bits set usually means a typo in the address or the prefix; guessing
            // either way could open the filter wider than intended.
            Ok(net) if net != net.trunc() => {
                return Err(Problem::at(
                    text.span(),
                    format!(
                        "{p}{key}: {value:?} has host bits set; did you mean \"{}\"?",
                        net.trunc()
                    ),
                ));
            }
            Ok(net) => net,
            // A single address is the obvious shorthand for a /32 or /128.
            Err(_) => match value.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(Problem::at(
                        text.span(),
                        format!(
                            "{p}{key}: {value:?} is not a network like \"10.0.0.0/8\" or \
                             \"2001:db8::/32\", or a single IP address"
                        ),
                    ));
                }
            },
        };
        out.push(net);
    }
    Ok(out)
}

/// Checks that `name` could be looked up as a DNS name (RFC 1035 lengths; letters, digits,
/// '-' and the '_' SRV labels use). Only the shape: nothing is resolved.
pub(crate) fn check_dns_name(name: &str) -> Result<(), String> {
    if name.contains(':') || name.parse::<IpAddr>().is_ok() {
        return Err("looks like an address; fixed backends go in static".to_string());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("it is empty".to_string());
    }
    if name.len() > 253 {
        return Err("longer than 253 characters".to_string());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label (two dots in a row or a leading dot)".to_string());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!("character {bad:?} is not allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}
