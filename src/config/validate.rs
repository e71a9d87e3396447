//! Turns the raw file into a [`Config`]: applies defaults, checks each value and the rules that
//! span several values (unique names and listeners, min <= max), and reports the first problem
//! with the span of the value (or table) at fault.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::admin;
use super::error::{Problem, line_column};
use super::raw::{RawFile, RawGlobal, RawHealth, RawResolver, RawService, Scalar, Text, TextList};
use super::values::{
    addresses, boolean, check_dns_name, duration_or, integer, nameserver, networks, nonzero,
    ordered, socket_addr, word,
};
use super::{
    AddressFamily, Balance, Config, GlobalConfig, HashKey, HealthConfig, LogFormat, ProxyProtocol,
    RatePerSource, ResolverConfig, ServiceConfig,
};

const NO_SERVICES: &str =
    "no services defined; add at least one [[service]] table with name, listen and srv or static";

pub(crate) fn config(text: &str, source: PathBuf) -> Result<Config, Problem> {
    let document = DeTable::parse(text).map_err(|e| Problem::from_toml(&e, ""))?;
    // Kept aside before the top-level pass consumes the document; see `RawFile::service`.
    let service_values = document.get_ref().get("service").cloned();
    let file = RawFile::deserialize(toml::de::Deserializer::from(document))
        .map_err(|e| Problem::from_toml(&e, ""))?;

    let (global, admin_span) = global(file.global.unwrap_or_default())?;
    let resolver = resolver(file.resolver.unwrap_or_default())?;

    let service_values = service_values.ok_or_else(|| Problem::whole_file(NO_SERVICES))?;
    let list_span = service_values.span();
    let DeValue::Array(array) = service_values.into_inner() else {
        // RawFile already demanded an array; this only guards against that changing.
        return Err(Problem::at(
            list_span,
            "service must be an array of tables ([[service]])",
        ));
    };
    if array.is_empty() {
        return Err(Problem::at(list_span, NO_SERVICES));
    }

    let mut services: Vec<ServiceConfig> = Vec::new();
    let mut name_lines: Vec<usize> = Vec::new();
    let mut listeners = Listeners::default();
    for (index, value) in array.into_iter().enumerate() {
        let header = value.span();
        let prefix = toml_error_prefix(&value, index);
        if !value.get_ref().is_table() {
            return Err(Problem::at(
                header,
                "each service must be a table ([[service]] or {name = ...})",
            ));
        }
        let raw = RawService::deserialize(ValueDeserializer::from(value))
            .map_err(|e| Problem::from_toml(&e, &prefix))?;
        let CheckedService {
            service,
            name_span,
            listen_spans,
        } = service(raw, header, index)?;

        if let Some(earlier) = services.iter().position(|s| s.name == service.name) {
            return Err(Problem::at(
                name_span,
                format!(
                    "service {:?}: name is already used by the service on line {}",
                    service.name, name_lines[earlier]
                ),
            ));
        }
        // In file order, so a conflict always blames the later listener.
        for (addr, span) in service.listen.iter().zip(listen_spans) {
            listeners.add(*addr, &service.name, span)?;
        }
        name_lines.push(line_column(text, name_span.start).0);
        services.push(service);
    }
    if let (Some(admin), Some(span)) = (global.admin, admin_span) {
        if let Some((taken, owner)) = listeners.conflict(admin) {
            return Err(Problem::at(
                span,
                format!(
                    "global.admin {admin} collides with listen address {taken} of service {owner:?}"
                ),
            ));
        }
    }

    Ok(Config {
        source,
        global,
        resolver,
        services,
    })
}

/// Prefix for toml's own errors inside a service: its name when it has a string one, else
/// its position, so "unknown field" still says which service.
fn toml_error_prefix(value: &Spanned<DeValue<'_>>, index: usize) -> String {
    match value
        .get_ref()
        .get("name")
        .and_then(|n| n.get_ref().as_str())
    {
        Some(name) => format!("service {name:?}: "),
        None => format!("service #{}: ", index + 1),
    }
}

fn global(raw: RawGlobal) -> Result<(GlobalConfig, Option<Range<usize>>), Problem> {
    let admin = match &raw.admin {
        Some(text) => Some(socket_addr(text, "", "global.admin")?),
        None => None,
    };
    let log_format = match &raw.log_format {
        Some(value) => word(
            value,
            "",
            "global.log_format",
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        )?,
        None => LogFormat::Text,
    };
    let shutdown_grace = duration_or(
        raw.shutdown_grace.as_ref(),
        Duration::from_secs(30),
        "",
        "global.shutdown_grace",
    )?;
    let access_log = match &raw.access_log {
        Some(text) if text.get_ref().is_empty() => {
            return Err(Problem::at(
                text.span(),
                "global.access_log: empty path; leave the key out for no access log",
            ));
        }
        Some(text) => Some(PathBuf::from(text.get_ref())),
        None => None,
    };
    let admin_socket = raw
        .admin_socket
        .as_ref()
        .map(admin::socket_path)
        .transpose()?;
    let admin_token = raw
        .admin_token_file
        .as_ref()
        .map(admin::token_file)
        .transpose()?;
    let access_log_format = match &raw.access_log_format {
        Some(value) => word(
            value,
            "",
            "global.access_log_format",
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        )?,
        None => LogFormat::Text,
    };
    let config = GlobalConfig {
        admin,
        admin_socket,
        admin_token,
        log_format,
        shutdown_grace,
        access_log,
        access_log_format,
        workers: workers(raw.workers.as_ref())?,
    };
    Ok((config, raw.admin.map(|a| a.span())))
}

/// `global.workers`: `"auto"` (the default: one per CPU) or a count from 1 to
/// `GlobalConfig::MAX_WORKERS`.
fn workers(value: Option<&Spanned<Scalar>>) -> Result<Option<NonZeroUsize>, Problem> {
    let Some(value) = value else {
        return Ok(None);
    };
    let max = GlobalConfig::MAX_WORKERS;
    match value.get_ref() {
        Scalar::Text(text) if text == "auto" => Ok(None),
        Scalar::Integer(n) if (1..=max).contains(n) => {
            Ok(usize::try_from(*n).ok().and_then(NonZeroUsize::new))
        }
        other => Err(Problem::at(
            value.span(),
            format!(
                "global.workers: expected \"auto\" or a number of threads from 1 to {max}, not {other}"
            ),
        )),
    }
}

fn resolver(raw: RawResolver) -> Result<ResolverConfig, Problem> {
    let nameservers = raw
        .nameservers
        .iter()
        .flatten()
        .map(nameserver)
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = duration_or(
        raw.timeout.as_ref(),
        Duration::from_secs(2),
        "",
        "resolver.timeout",
    )?;
    nonzero(timeout, raw.timeout.as_ref(), "", "resolver.timeout")?;
    let min_refresh = duration_or(
        raw.min_refresh.as_ref(),
        Duration::from_secs(1),
        "",
        "resolver.min_refresh",
    )?;
    // A zero floor would let a TTL-0 record drive a query loop.
    nonzero(
        min_refresh,
        raw.min_refresh.as_ref(),
        "",
        "resolver.min_refresh",
    )?;
    let max_refresh = duration_or(
        raw.max_refresh.as_ref(),
        Duration::from_secs(60),
        "",
        "resolver.max_refresh",
    )?;
    ordered(
        (
            "resolver.min_refresh",
            min_refresh,
            raw.min_refresh.as_ref(),
        ),
        (
            "resolver.max_refresh",
            max_refresh,
            raw.max_refresh.as_ref(),
        ),
        "",
    )?;
    let empty_hold = duration_or(
        raw.empty_hold.as_ref(),
        Duration::from_secs(30),
        "",
        "resolver.empty_hold",
    )?;
    let family = match &raw.family {
        Some(v) => word(
            v,
            "",
            "resolver.family",
            &[
                ("any", AddressFamily::Any),
                ("ipv4", AddressFamily::Ipv4),
                ("ipv6", AddressFamily::Ipv6),
            ],
        )?,
        None => AddressFamily::Any,
    };
    Ok(ResolverConfig {
        nameservers,
        timeout,
        min_refresh,
        max_refresh,
        empty_hold,
        family,
    })
}

/// A service valid on its own, with the spans the checks across services point at.
struct CheckedService {
    service: ServiceConfig,
    name_span: Range<usize>,
    listen_spans: Vec<Range<usize>>,
}

/// Validates one service on its own: its identity and listeners, its discovery source, then
/// each group of settings in turn.
fn service(
    mut raw: RawService,
    header: Range<usize>,
    index: usize,
) -> Result<CheckedService, Problem> {
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

    let balance = match &raw.balance {
        Some(v) => word(
            v,
            p,
            "balance",
            &[("maglev", Balance::Maglev), ("p2c", Balance::P2c)],
        )?,
        None => Balance::Maglev,
    };
    let hash_key = match &raw.hash_key {
        Some(v) => word(
            v,
            p,
            "hash_key",
            &[
                ("client_ip", HashKey::ClientIp),
                ("client_ip_port", HashKey::ClientIpPort),
            ],
        )?,
        None => HashKey::ClientIp,
    };
    let connect_timeout = positive_duration(raw.connect_timeout.as_ref(), 2, p, "connect_timeout")?;
    // Zero would close every connection at once; there is no "disabled" meaning to give it.
    let idle_timeout = positive_duration(raw.idle_timeout.as_ref(), 3600, p, "idle_timeout")?;
    let tcp_keepalive = keepalive(raw.tcp_keepalive.as_ref(), p)?;
    let connect_retries = integer(raw.connect_retries.as_ref(), 2, 0, p, "connect_retries")?;
    // u32 bounds the limit to what the connection semaphore can hold.
    let max_connections: u32 = integer(
        raw.max_connections.as_ref(),
        10_000,
        1,
        p,
        "max_connections",
    )?;
    let max_connections = usize::try_from(max_connections).unwrap_or(usize::MAX);
    let (max_connections_per_source, rate_per_source) = per_source(&raw, p)?;
    let allow = networks(raw.allow.as_deref(), p, "allow")?;
    let deny = networks(raw.deny.as_deref(), p, "deny")?;
    let send_proxy = match &raw.send_proxy {
        Some(v) => Some(word(
            v,
            p,
            "send_proxy",
            &[("v1", ProxyProtocol::V1), ("v2", ProxyProtocol::V2)],
        )?),
        None => None,
    };
    let accept_proxy = boolean(raw.accept_proxy.as_ref(), false, p, "accept_proxy")?;
    let accept_proxy_timeout = positive_duration(
        raw.accept_proxy_timeout.as_ref(),
        5,
        p,
        "accept_proxy_timeout",
    )?;
    let accept_proxy_from = networks(raw.accept_proxy_from.as_deref(), p, "accept_proxy_from")?;
    let health = health(raw.health.take().unwrap_or_default(), p)?;

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
        max_connections,
        max_connections_per_source,
        rate_per_source,
        allow,
        deny,
        send_proxy,
        accept_proxy,
        accept_proxy_timeout,
        accept_proxy_from,
        health,
    };
    Ok(CheckedService {
        service,
        name_span,
        listen_spans,
    })
}

/// A duration key that must be greater than zero, defaulting to `default_secs`.
fn positive_duration(
    value: Option<&Spanned<Scalar>>,
    default_secs: u64,
    p: &str,
    key: &str,
) -> Result<Duration, Problem> {
    let duration = duration_or(value, Duration::from_secs(default_secs), p, key)?;
    nonzero(duration, value, p, key)?;
    Ok(duration)
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
    let max_open = match &raw.max_connections_per_source {
        Some(v) => Some(integer(Some(v), 1, 1, p, "max_connections_per_source")?),
        None => None,
    };
    let rate = match (&raw.rate_per_source, &raw.rate_per_source_burst) {
        (Some(v), burst) => Some(rate(v, burst.as_ref(), p)?),
        (None, Some(burst)) => {
            return Err(Problem::at(
                burst.span(),
                format!("{p}rate_per_source_burst needs rate_per_source"),
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
        other => super::duration::parse_duration(other).map_err(&bad)?,
    };
    if per.is_zero() {
        return Err(bad("the period is zero".to_string()));
    }
    let burst = match burst {
        Some(b) => integer(Some(b), count, 1, p, "rate_per_source_burst")?,
        None => count,
    };
    Ok(RatePerSource { count, per, burst })
}

/// `tcp_keepalive`: a duration (default 30s), `true` for the default, or `false` for off.
fn keepalive(value: Option<&Spanned<Scalar>>, p: &str) -> Result<Option<Duration>, Problem> {
    const DEFAULT: Duration = Duration::from_secs(30);
    match value.map(Spanned::get_ref) {
        None | Some(Scalar::Boolean(true)) => Ok(Some(DEFAULT)),
        Some(Scalar::Boolean(false)) => Ok(None),
        Some(_) => {
            let interval = duration_or(value, DEFAULT, p, "tcp_keepalive")?;
            // The kernel counts keepalive time in whole seconds, from 1 to 32767.
            if interval < Duration::from_secs(1) || interval > Duration::from_secs(32_767) {
                let span = value.map(Spanned::span).unwrap_or(0..0);
                return Err(Problem::at(
                    span,
                    format!(
                        "{p}tcp_keepalive: must be between 1s and 32767s, or false to turn it off"
                    ),
                ));
            }
            Ok(Some(interval))
        }
    }
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

fn health(raw: RawHealth, p: &str) -> Result<HealthConfig, Problem> {
    let consecutive_failures = integer(
        raw.consecutive_failures.as_ref(),
        3,
        1,
        p,
        "health.consecutive_failures",
    )?;
    let base_ejection = duration_or(
        raw.base_ejection.as_ref(),
        Duration::from_secs(10),
        p,
        "health.base_ejection",
    )?;
    nonzero(
        base_ejection,
        raw.base_ejection.as_ref(),
        p,
        "health.base_ejection",
    )?;
    let max_ejection = duration_or(
        raw.max_ejection.as_ref(),
        Duration::from_secs(300),
        p,
        "health.max_ejection",
    )?;
    ordered(
        (
            "health.base_ejection",
            base_ejection,
            raw.base_ejection.as_ref(),
        ),
        (
            "health.max_ejection",
            max_ejection,
            raw.max_ejection.as_ref(),
        ),
        p,
    )?;
    let percent: u32 = integer(
        raw.max_ejected_percent.as_ref(),
        50,
        0,
        p,
        "health.max_ejected_percent",
    )?;
    let max_ejected_percent = u8::try_from(percent)
        .ok()
        .filter(|percent| *percent <= 100)
        .ok_or_else(|| {
            // Only reachable with an explicit value: the default is 50.
            let span = raw.max_ejected_percent.map_or(0..0, |v| v.span());
            Problem::at(
                span,
                format!("{p}health.max_ejected_percent must be at most 100, not {percent}"),
            )
        })?;
    Ok(HealthConfig {
        consecutive_failures,
        base_ejection,
        max_ejection,
        max_ejected_percent,
    })
}

/// Every listen address taken so far and by whom.
#[derive(Default)]
struct Listeners {
    taken: Vec<(SocketAddr, String)>,
}

impl Listeners {
    /// The first taken address that `addr` could not be bound beside: the same address, or
    /// the same port and family where either side is the wildcard (which takes the port on
    /// every interface of that family).
    fn conflict(&self, addr: SocketAddr) -> Option<(SocketAddr, &str)> {
        self.taken
            .iter()
            .find(|(taken, _)| {
                taken.port() == addr.port()
                    && taken.is_ipv4() == addr.is_ipv4()
                    && (taken.ip() == addr.ip()
                        || taken.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            })
            .map(|(taken, owner)| (*taken, owner.as_str()))
    }

    fn add(&mut self, addr: SocketAddr, service: &str, span: Range<usize>) -> Result<(), Problem> {
        if let Some((taken, owner)) = self.conflict(addr) {
            let p = format!("service {service:?}: ");
            let message = match (taken == addr, owner == service) {
                (true, false) => {
                    format!("{p}listen address {addr} is already used by service {owner:?}")
                }
                (false, false) => format!(
                    "{p}listen address {addr} overlaps {taken} of service {owner:?} \
                     (a wildcard address takes the port on every interface)"
                ),
                // Exact repeats within one service are caught while parsing the list.
                (_, true) => format!(
                    "{p}listen address {addr} overlaps {taken} of the same service \
                     (a wildcard address takes the port on every interface)"
                ),
            };
            return Err(Problem::at(span, message));
        }
        self.taken.push((addr, service.to_string()));
        Ok(())
    }
}
