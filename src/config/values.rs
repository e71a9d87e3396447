//! Checks of single values: durations, integers, keywords, addresses, networks and DNS
//! names. Each returns the typed value or a [`Problem`] pointing at the value as written;
//! `validate` composes them and adds the rules that relate several values.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::duration::{DURATION_HINT, format_duration, parse_duration};
use super::error::Problem;
use super::raw::{Scalar, Text, TextList};

pub(crate) fn duration_or(
    value: Option<&Spanned<Scalar>>,
    default: Duration,
    p: &str,
    key: &str,
) -> Result<Duration, Problem> {
    let Some(value) = value else {
        return Ok(default);
    };
    let reason = match value.get_ref() {
        Scalar::Text(text) => match parse_duration(text) {
            Ok(duration) => return Ok(duration),
            Err(reason) => reason,
        },
        number @ (Scalar::Integer(_) | Scalar::Float(_)) => format!("{number} has no unit"),
        other => format!("{other} is not a duration"),
    };
    Err(Problem::at(
        value.span(),
        format!("{p}{key}: {reason}; {DURATION_HINT}"),
    ))
}

/// A `true`/`false` key.
pub(crate) fn boolean(
    value: Option<&Spanned<Scalar>>,
    default: bool,
    p: &str,
    key: &str,
) -> Result<bool, Problem> {
    match value.map(|v| (v.get_ref(), v.span())) {
        None => Ok(default),
        Some((Scalar::Boolean(b), _)) => Ok(*b),
        Some((other, span)) => Err(Problem::at(
            span,
            format!("{p}{key}: expected true or false, not {other}"),
        )),
    }
}

pub(crate) fn nonzero(
    duration: Duration,
    value: Option<&Spanned<Scalar>>,
    p: &str,
    key: &str,
) -> Result<(), Problem> {
    match value {
        Some(value) if duration.is_zero() => Err(Problem::at(
            value.span(),
            format!("{p}{key} must be greater than zero"),
        )),
        _ => Ok(()),
    }
}

/// Checks `low <= high`; blames `low` when it was written, else `high` (a default cannot be
/// at fault, and both defaults are ordered).
pub(crate) fn ordered(
    low: (&str, Duration, Option<&Spanned<Scalar>>),
    high: (&str, Duration, Option<&Spanned<Scalar>>),
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
            "{p}{low_key} ({}) must not be longer than {high_key} ({})",
            shown(low_value, low_raw),
            shown(high_value, high_raw)
        ),
    ))
}

/// An integer key with a lower bound; the upper bound is the target type's.
pub(crate) fn integer<T: TryFrom<i64>>(
    value: Option<&Spanned<i64>>,
    default: T,
    min: i64,
    p: &str,
    key: &str,
) -> Result<T, Problem> {
    let Some(value) = value else {
        return Ok(default);
    };
    let n = *value.get_ref();
    if n < min {
        return Err(Problem::at(
            value.span(),
            format!("{p}{key} must be at least {min}, not {n}"),
        ));
    }
    T::try_from(n).map_err(|_| Problem::at(value.span(), format!("{p}{key} {n} is too large")))
}

pub(crate) fn word<T: Copy>(
    value: &Spanned<Scalar>,
    p: &str,
    key: &str,
    choices: &[(&str, T)],
) -> Result<T, Problem> {
    if let Scalar::Text(text) = value.get_ref() {
        if let Some((_, choice)) = choices.iter().find(|(w, _)| w == text) {
            return Ok(*choice);
        }
    }
    let quoted: Vec<String> = choices.iter().map(|(w, _)| format!("{w:?}")).collect();
    let allowed = match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(Problem::at(
        value.span(),
        format!("{p}{key} must be {allowed}, not {}", value.get_ref()),
    ))
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

/// A nameserver: "ip:port", "[v6]:port", or a bare "ip" / "[v6]" meaning port 53.
pub(crate) fn nameserver(text: &Text) -> Result<SocketAddr, Problem> {
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
            "resolver.nameservers: {value:?} is not an IP address or IP:port (like \"127.0.0.1:8600\"; \
             port 53 if omitted, and no host names)"
        ),
    ))
}

pub(crate) fn networks(list: Option<&[Text]>, p: &str, key: &str) -> Result<Vec<IpNet>, Problem> {
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
