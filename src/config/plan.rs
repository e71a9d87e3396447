//! `srvlb check`'s plan: what the balancer will do with a configuration, in plain words and
//! with every default spelled out, so an operator can review it without reading the file.

use std::fmt::Write as _;

use super::duration::format_duration as dur;
use super::keys::Keyword as _;
use super::{AddressFamily, Balance, Config, DataPath, HashKey, ProxyProtocol, ServiceConfig};

/// Width of the label column; the longest label ("empty answer hold") plus two spaces.
const LABEL_WIDTH: usize = 19;

pub(crate) fn render(config: &Config) -> String {
    let mut out = String::new();
    let listeners: usize = config.services.iter().map(|s| s.listen.len()).sum();
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    line(
        &mut out,
        &format!(
            "# srvlb plan for {}: {}, {}",
            config.source.display(),
            plural(config.services.len(), "service"),
            plural(listeners, "listener")
        ),
    );
    render_global(&mut out, config);
    render_resolver(&mut out, config);
    for service in &config.services {
        out.push('\n');
        render_service(&mut out, service, config);
    }
    out
}

fn render_global(out: &mut String, config: &Config) {
    let global = &config.global;
    line(out, "\nglobal");
    let admin = global
        .admin
        .map_or_else(|| "none".to_string(), |a| format!("{a} (metrics, status)"));
    row(out, "admin", &[admin]);
    render_admin(out, config);
    row(out, "log format", &[global.log_format.word().to_string()]);
    row(out, "shutdown grace", &[dur(global.shutdown_grace)]);
    let access_log = match &global.access_log {
        None => "off".to_string(),
        Some(path) => {
            let format = global.access_log_format.word();
            format!("{} ({format}, reopened on SIGUSR1)", path.display())
        }
    };
    row(out, "access log", &[access_log]);
    let workers = match global.workers {
        Some(n) => format!("{n} (read at start; a reload keeps the running count)"),
        None => format!(
            "auto: {} on this machine, one per CPU (read at start)",
            global.worker_count()
        ),
    };
    row(out, "workers", &[workers]);
}

fn render_resolver(out: &mut String, config: &Config) {
    let resolver = &config.resolver;
    line(out, "\nresolver");
    row(out, "nameservers", &[nameservers(config)]);
    row(out, "timeout", &[dur(resolver.timeout)]);
    let family = match resolver.family {
        AddressFamily::Any => "any (A and AAAA of SRV targets)",
        AddressFamily::Ipv4 => "ipv4 (A only; AAAA neither asked for nor tried)",
        AddressFamily::Ipv6 => "ipv6 (AAAA only; A neither asked for nor tried)",
    };
    row(out, "family", &[family.to_string()]);
    row(
        out,
        "refresh",
        &[format!(
            "record TTL, clamped to {}..{} (target addresses on their own TTL; absent names and failing lookups back off up to the maximum)",
            dur(resolver.min_refresh),
            dur(resolver.max_refresh)
        )],
    );
    row(
        out,
        "empty answer hold",
        &[format!(
            "keep backends {} after NXDOMAIN or an empty answer",
            dur(resolver.empty_hold)
        )],
    );
}

/// One service's rows: where clients come in, where backends come from, how one is
/// picked and connected, the limits, the PROXY protocol both ways, and health.
fn render_service(out: &mut String, s: &ServiceConfig, config: &Config) {
    line(out, &format!("service {:?}", s.name));
    let listen: Vec<String> = s.listen.iter().map(|a| a.to_string()).collect();
    row(out, "listen", &listen);
    row(out, "discovery", &discovery(s, config));
    let balance = match (s.balance, s.hash_key) {
        (Balance::Maglev, HashKey::ClientIp) => "maglev, keyed by client IP",
        (Balance::Maglev, HashKey::ClientIpPort) => "maglev, keyed by client IP and port",
        (Balance::P2c, _) => "p2c, the less loaded (per weight) of two random backends",
    };
    row(out, "balance", &[balance.to_string()]);
    row(out, "connect", &[connect(s)]);
    row(out, "idle timeout", &[dur(s.idle_timeout)]);
    row(out, "tcp keepalive", &[keepalive(s)]);
    row(out, "max connections", &[s.max_connections.to_string()]);
    row(out, "per source", &[per_source(s)]);
    row(out, "source filter", &[source_filter(s)]);
    let proxy = match s.send_proxy {
        None => "off",
        Some(ProxyProtocol::V1) => "v1 (text)",
        Some(ProxyProtocol::V2) => "v2 (binary)",
    };
    row(out, "send PROXY", &[proxy.to_string()]);
    row(out, "accept PROXY", &[accept_proxy(s)]);
    let data_path = match s.data_path {
        DataPath::Epoll => "epoll (read/write, splice(2) for bulk)",
        DataPath::IoUring => "io_uring (batched receives and sends; epoll where unavailable)",
    };
    row(out, "data path", &[data_path.to_string()]);
    let h = &s.health;
    row(
        out,
        "health",
        &[
            format!(
                "eject after {} consecutive connect failures",
                h.consecutive_failures
            ),
            format!(
                "for {}, doubling on each repeat up to {}",
                dur(h.base_ejection),
                dur(h.max_ejection)
            ),
            format!("at most {}% of a tier ejected", h.max_ejected_percent),
        ],
    );
}

/// The SRV name and each static backend, one per line.
fn discovery(s: &ServiceConfig, config: &Config) -> Vec<String> {
    let mut discovery = Vec::new();
    if let Some(srv) = &s.srv {
        discovery.push(format!("SRV {srv} via {}", nameservers(config)));
    }
    // Beside an SRV name, static backends only stand in when no SRV backend is usable.
    let role = if s.srv.is_some() {
        " (last resort)"
    } else {
        ""
    };
    for backend in &s.static_backends {
        discovery.push(format!("static {backend}{role}"));
    }
    discovery
}

fn connect(s: &ServiceConfig) -> String {
    let retries = match s.connect_retries {
        0 => "no retry".to_string(),
        1 => "1 retry on another backend".to_string(),
        n => format!("up to {n} retries on other backends"),
    };
    format!("timeout {}, {retries}", dur(s.connect_timeout))
}

fn keepalive(s: &ServiceConfig) -> String {
    match s.tcp_keepalive {
        None => "off".to_string(),
        Some(every) => format!(
            "probe after {} of silence, every {} after; peer gone after {} unanswered",
            dur(every),
            dur(every),
            super::KEEPALIVE_PROBES
        ),
    }
}

fn per_source(s: &ServiceConfig) -> String {
    if s.max_connections_per_source.is_none() && s.rate_per_source.is_none() {
        return "no limit".to_string();
    }
    let mut parts = Vec::new();
    if let Some(open) = s.max_connections_per_source {
        parts.push(format!("{open} open"));
    }
    if let Some(r) = s.rate_per_source {
        parts.push(format!(
            "{} new per {} (burst {})",
            r.count,
            dur(r.per),
            r.burst
        ));
    }
    format!(
        "{} per source (IPv4 address or IPv6 /64); over it, closed at once",
        parts.join(", ")
    )
}

fn accept_proxy(s: &ServiceConfig) -> String {
    if !s.accept_proxy {
        return "off".to_string();
    }
    let from = if s.accept_proxy_from.is_empty() {
        "from any peer (WARNING: any client can claim any address; set accept_proxy_from)"
            .to_string()
    } else {
        let nets: Vec<String> = s.accept_proxy_from.iter().map(|n| n.to_string()).collect();
        format!("only from {}", nets.join(", "))
    };
    format!(
        "required (v1 or v2), within {}, {from}; its client address stands for the connection's",
        dur(s.accept_proxy_timeout)
    )
}

/// The admin endpoint's unix socket and authentication.
fn render_admin(out: &mut String, config: &Config) {
    let global = &config.global;
    let socket = global.admin_socket.as_ref().map_or_else(
        || "none".to_string(),
        |path| {
            format!(
                "{} (mode {:04o}; a stale socket file is replaced, removed on exit)",
                path.display(),
                crate::admin::SOCKET_MODE
            )
        },
    );
    row(out, "admin socket", &[socket]);
    let auth = match &global.admin_token {
        None => "none (anyone who can connect may read /metrics and /status)".to_string(),
        Some(token) => {
            let unused = if global.admin.is_none() && global.admin_socket.is_none() {
                " (unused: no admin endpoint)"
            } else {
                ""
            };
            format!(
                "bearer token from {} ({} bytes) for /metrics and /status; /healthz open{unused}",
                token.path().display(),
                token.len()
            )
        }
    };
    row(out, "admin auth", &[auth]);
}

fn nameservers(config: &Config) -> String {
    let servers = &config.resolver.nameservers;
    if servers.is_empty() {
        "system resolver (resolv.conf)".to_string()
    } else {
        let list: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
        list.join(", ")
    }
}

fn source_filter(s: &ServiceConfig) -> String {
    let join = |nets: &[ipnet::IpNet]| {
        nets.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (s.allow.is_empty(), s.deny.is_empty()) {
        (true, true) => "any client".to_string(),
        (false, true) => format!("only {}", join(&s.allow)),
        (true, false) => format!("any client except {}", join(&s.deny)),
        (false, false) => format!("only {}, except {}", join(&s.allow), join(&s.deny)),
    }
}

fn line(out: &mut String, text: &str) {
    out.push_str(text);
    out.push('\n');
}

/// A labelled row; further values go on their own lines under the first, aligned.
fn row(out: &mut String, label: &str, values: &[String]) {
    let mut label = label;
    for value in values {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  {label:<LABEL_WIDTH$}{value}");
        label = "";
    }
}
