//! One `[[service]]` table on its own: its name, listeners and discovery source (required,
//! with messages of their own), every generic key through its kind's check, and the
//! per-source limits, whose burst needs a rate. The checks across services (unique names,
//! free listen addresses) are the caller's.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::super::error::Problem;
use super::super::keys::SERVICE;
use super::super::raw::{RawService, Scalar, Text, TextList};
use super::super::values::{
    addresses, boolean, check_dns_name, duration, duration_or_switch, integer, keyword, networks,
    optional_integer, optional_keyword,
};
use super::super::{RatePerSource, ServiceConfig};
use super::tables::health;

/// A service valid on its own, with the spans the checks across services point at.
pub(super) struct CheckedService {
    pub(crate) service: ServiceConfig,
    pub(crate) name_span: Range<usize>,
    pub(crate) listen_spans: Vec<Range<usize>>,
}

/// Validates one service on its own: its identity and listeners, its discovery source, then
/// each setting in the order of `ServiceConfig` (the first bad one is reported).
pub(super) fn service(
    mut raw: RawService,
    header: Range<usize>,
    index: usize,
) -> Result<CheckedService, Problem> {
    let k = &SERVICE;
    let (name, name_span) = service_name(raw.name.take(), header.clone(), index)?;
    let p = format!("service {name:?}: ");
    let p = p.as_str();
    let listen_spans: Vec<Range<usize>> = raw
        .listen
        .iter()
        .flat_map(|list| list.get_ref().iter().map(|text| text.span()))
        .collect();
    let listen = listen(raw.listen.as_ref(), header.clone(), p)?;
    let (srv, static_backends) =
        discovery_source(raw.srv.take(), raw.static_backends.as_ref(), header, p)?;
    let balance = keyword(&k.balance, raw.balance.as_ref(), p)?;
    let hash_key = keyword(&k.hash_key, raw.hash_key.as_ref(), p)?;
    let connect_timeout = duration(&k.connect_timeout, raw.connect_timeout.as_ref(), p)?;
    let idle_timeout = duration(&k.idle_timeout, raw.idle_timeout.as_ref(), p)?;
    let tcp_keepalive = duration_or_switch(&k.tcp_keepalive, raw.tcp_keepalive.as_ref(), p)?;
    let connect_retries = integer(&k.connect_retries, raw.connect_retries.as_ref(), p)?;
    let max_connections: u32 = integer(&k.max_connections, raw.max_connections.as_ref(), p)?;
    let (max_connections_per_source, rate_per_source) = per_source(&raw, p)?;
    let service = ServiceConfig {
        name,
        listen,
        srv,
        static_backends,
        balance,
        hash_key,
        connect_timeout,
        idle_timeout,
        tcp_keepalive,
        connect_retries,
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        max_connections_per_source,
        rate_per_source,
        allow: networks(&k.allow, raw.allow.as_deref(), p)?,
        deny: networks(&k.deny, raw.deny.as_deref(), p)?,
        send_proxy: optional_keyword(&k.send_proxy, raw.send_proxy.as_ref(), p)?,
        accept_proxy: boolean(&k.accept_proxy, raw.accept_proxy.as_ref(), p)?,
        accept_proxy_timeout: duration(
            &k.accept_proxy_timeout,
            raw.accept_proxy_timeout.as_ref(),
            p,
        )?,
        accept_proxy_from: networks(&k.accept_proxy_from, raw.accept_proxy_from.as_deref(), p)?,
        data_path: keyword(&k.data_path, raw.data_path.as_ref(), p)?,
        health: health(raw.health.take().unwrap_or_default(), p)?,
    };
    Ok(CheckedService {
        service,
        name_span,
        listen_spans,
    })
}

fn service_name(
    raw: Option<Text>,
    header: Range<usize>,
    index: usize,
) -> Result<(String, Range<usize>), Problem> {
    let p = format!("service #{}: ", index + 1);
    let Some(name) = raw else {
        return Err(Problem::at(header, format!("{p}name is required")));
    };
    let span = name.span();
    let name = name.into_inner();
    if name.is_empty() {
        return Err(Problem::at(span, format!("{p}name must not be empty")));
    }
    // Names appear in logs, metrics labels and /status; keep them to a safe alphabet.
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Problem::at(
            span,
            format!("{p}name {name:?} may only contain letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok((name, span))
}

/// `listen`: required, not empty, every entry an address.
fn listen(
    raw: Option<&TextList>,
    header: Range<usize>,
    p: &str,
) -> Result<Vec<SocketAddr>, Problem> {
    match raw {
        None => Err(Problem::at(
            header,
            format!(r#"{p}listen is required, e.g. listen = ["127.0.0.1:5432"]"#),
        )),
        Some(list) if list.get_ref().is_empty() => Err(Problem::at(
            list.span(),
            format!("{p}listen must not be empty"),
        )),
        Some(list) => addresses(list, p, "listen address"),
    }
}

/// `srv` and `static`: at least one, `srv` a DNS name, `static` addresses.
fn discovery_source(
    srv: Option<Text>,
    statics: Option<&TextList>,
    header: Range<usize>,
    p: &str,
) -> Result<(Option<String>, Vec<SocketAddr>), Problem> {
    let srv = match srv {
        Some(text) => {
            if let Err(reason) = check_dns_name(text.get_ref()) {
                return Err(Problem::at(
                    text.span(),
                    format!(
                        "{p}srv {:?} is not a valid DNS name: {reason}",
                        text.get_ref()
                    ),
                ));
            }
            Some(text.into_inner())
        }
        None => None,
    };
    let static_backends = match statics {
        Some(list) => addresses(list, p, "static backend")?,
        None => Vec::new(),
    };
    if srv.is_none() && static_backends.is_empty() {
        let span = statics.map_or(header, |s| s.span());
        return Err(Problem::at(
            span,
            format!(
                r#"{p}no discovery source: set srv = "_name._tcp.example.com", static = ["10.0.0.5:5432"], or both"#
            ),
        ));
    }
    Ok((srv, static_backends))
}

/// `max_connections_per_source`, `rate_per_source` and its `rate_per_source_burst`.
fn per_source(raw: &RawService, p: &str) -> Result<(Option<u32>, Option<RatePerSource>), Problem> {
    let k = &SERVICE;
    let max_open = optional_integer(
        &k.max_connections_per_source,
        raw.max_connections_per_source.as_ref(),
        p,
    )?;
    let rate = match (&raw.rate_per_source, &raw.rate_per_source_burst) {
        (Some(v), burst) => Some(rate(v, burst.as_ref(), p)?),
        (None, Some(burst)) => {
            return Err(Problem::at(
                burst.span(),
                format!(
                    "{p}{} needs {}",
                    k.rate_per_source_burst.path(),
                    k.rate_per_source.path()
                ),
            ));
        }
        (None, None) => None,
    };
    Ok((max_open, rate))
}

/// `rate_per_source = "N/s"` (or `/m`, `/h`, or `/` and a duration such as `"100/10s"`), with
/// `rate_per_source_burst` (default N).
fn rate(
    value: &Spanned<Scalar>,
    burst: Option<&Spanned<i64>>,
    p: &str,
) -> Result<RatePerSource, Problem> {
    const HINT: &str = "expected a rate like \"50/s\", \"600/m\" or \"100/10s\"";
    let bad = |why: String| Problem::at(value.span(), format!("{p}rate_per_source: {why}; {HINT}"));
    let Scalar::Text(text) = value.get_ref() else {
        return Err(bad(format!("{} is not a rate", value.get_ref())));
    };
    let Some((count, per)) = text.split_once('/') else {
        return Err(bad(format!("{text:?} has no \"/\"")));
    };
    let count: u32 = count
        .trim()
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            bad(format!(
                "{count:?} is not a whole number of connections >= 1"
            ))
        })?;
    let per = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => super::super::duration::parse_duration(other).map_err(&bad)?,
    };
    if per.is_zero() {
        return Err(bad("the period is zero".to_string()));
    }
    let burst = optional_integer(&SERVICE.rate_per_source_burst, burst, p)?.unwrap_or(count);
    Ok(RatePerSource { count, per, burst })
}
