//! Unit tests for parsing, defaults, durations and the plan; the error messages and their
//! locations are in `tests/errors.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use super::duration::{format_duration, parse_duration};
use super::*;

mod errors;

/// A minimal valid service, for tests that only care about other parts of the file.
const SERVICE: &str =
    "[[service]]\nname = \"pg\"\nlisten = [\"127.0.0.1:5432\"]\nstatic = [\"10.0.0.5:5432\"]\n";

fn ok(text: &str) -> Config {
    match Config::parse(text, "t.toml") {
        Ok(config) => config,
        Err(e) => panic!("expected a valid config, got: {e}"),
    }
}

/// The full error line, so each test checks file, line, column and message at once.
fn err(text: &str) -> String {
    match Config::parse(text, "t.toml") {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(e) => e.to_string(),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn sample_config_is_valid() {
    let config = ok(include_str!("../../config.toml"));
    assert_eq!(config.services.len(), 2);
    let pg = &config.services[0];
    assert_eq!(
        pg.srv.as_deref(),
        Some("_postgresql._tcp.db.service.consul")
    );
    assert!(!pg.static_backends.is_empty());
    for service in &config.services {
        for listen in &service.listen {
            assert!(listen.ip().is_loopback(), "{listen} is not loopback");
            assert!(listen.port() >= 1024, "{listen} is not a high port");
        }
    }
}

#[test]
fn defaults_are_applied() {
    let config = ok(SERVICE);
    assert_eq!(config.source, PathBuf::from("t.toml"));
    assert_eq!(
        config.global,
        GlobalConfig {
            admin: None,
            admin_socket: None,
            admin_token: None,
            log_format: LogFormat::Text,
            shutdown_grace: Duration::from_secs(30),
            access_log: None,
            access_log_format: LogFormat::Text,
            workers: None,
        }
    );
    assert_eq!(
        config.resolver,
        ResolverConfig {
            nameservers: vec![],
            timeout: Duration::from_secs(2),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(60),
            empty_hold: Duration::from_secs(30),
            family: AddressFamily::Any,
        }
    );
    let expected = ServiceConfig {
        name: "pg".to_string(),
        listen: vec![addr("127.0.0.1:5432")],
        srv: None,
        static_backends: vec![addr("10.0.0.5:5432")],
        balance: Balance::Maglev,
        hash_key: HashKey::ClientIp,
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(3600),
        tcp_keepalive: Some(Duration::from_secs(30)),
        connect_retries: 2,
        max_connections: 10_000,
        max_connections_per_source: None,
        rate_per_source: None,
        allow: vec![],
        deny: vec![],
        send_proxy: None,
        accept_proxy: false,
        accept_proxy_timeout: Duration::from_secs(5),
        accept_proxy_from: vec![],
        data_path: DataPath::Epoll,
        health: HealthConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        },
    };
    assert_eq!(config.services, vec![expected]);
}

#[test]
fn workers_is_auto_or_a_count_in_range() {
    let auto = ok(&format!("[global]\nworkers = \"auto\"\n{SERVICE}"));
    assert_eq!(auto.global.workers, None);
    assert!(auto.global.worker_count().get() >= 1);
    for bad in ["0", "1025", "-1", "\"many\"", "2.5"] {
        let e = err(&format!("[global]\nworkers = {bad}\n{SERVICE}"));
        assert!(
            e.starts_with("t.toml:2:11: global.workers: expected \"auto\" or a number of threads from 1 to 1024"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn every_key_is_read() {
    let config = ok(r#"
[global]
admin = "[::1]:9901"
log_format = "json"
shutdown_grace = "0s"
access_log = "/var/log/srvlb/access.log"
access_log_format = "json"
workers = 3
[resolver]
nameservers = ["10.0.0.53", "127.0.0.1:8600", "[::1]:5353", "::2", "[::3]"]
timeout = "500ms"
min_refresh = "5s"
max_refresh = "5m"
empty_hold = "0s"
[[service]]
name = "a.b-c_d"
listen = ["[::]:5432", "0.0.0.0:5432"]
srv = "db.service.consul."
balance = "p2c"
hash_key = "client_ip_port"
connect_timeout = "1s500ms"
idle_timeout = "1h30m"
tcp_keepalive = "75s"
connect_retries = 0
max_connections = 7
allow = ["10.0.0.0/8", "192.0.2.7"]
deny = ["2001:db8::/32"]
send_proxy = "v1"
accept_proxy = true
accept_proxy_timeout = "750ms"
data_path = "io_uring"
[service.health]
consecutive_failures = 1
base_ejection = "1s"
max_ejection = "1s"
max_ejected_percent = 100
"#);
    assert_eq!(config.global.admin, Some(addr("[::1]:9901")));
    assert_eq!(config.global.log_format, LogFormat::Json);
    assert_eq!(config.global.shutdown_grace, Duration::ZERO);
    assert_eq!(
        config.global.access_log.as_deref(),
        Some(Path::new("/var/log/srvlb/access.log"))
    );
    assert_eq!(config.global.access_log_format, LogFormat::Json);
    assert_eq!(config.global.workers.map(|n| n.get()), Some(3));
    let ns: Vec<SocketAddr> = [
        "10.0.0.53:53",
        "127.0.0.1:8600",
        "[::1]:5353",
        "[::2]:53",
        "[::3]:53",
    ]
    .iter()
    .map(|s| addr(s))
    .collect();
    assert_eq!(config.resolver.nameservers, ns);
    assert_eq!(config.resolver.timeout, Duration::from_millis(500));
    let s = &config.services[0];
    assert_eq!(s.listen, vec![addr("[::]:5432"), addr("0.0.0.0:5432")]);
    assert_eq!(s.srv.as_deref(), Some("db.service.consul."));
    assert_eq!(
        (s.balance, s.hash_key),
        (Balance::P2c, HashKey::ClientIpPort)
    );
    assert_eq!(s.connect_timeout, Duration::from_millis(1500));
    assert_eq!(s.data_path, DataPath::IoUring);
    assert_eq!(s.idle_timeout, Duration::from_secs(5400));
    assert_eq!(s.tcp_keepalive, Some(Duration::from_secs(75)));
    assert_eq!((s.connect_retries, s.max_connections), (0, 7));
    assert_eq!(
        s.allow,
        vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.7/32".parse().unwrap()
        ]
    );
    assert_eq!(s.deny, vec!["2001:db8::/32".parse().unwrap()]);
    assert_eq!(s.send_proxy, Some(ProxyProtocol::V1));
    assert!(s.accept_proxy);
    assert_eq!(s.accept_proxy_timeout, Duration::from_millis(750));
    assert_eq!(s.health.consecutive_failures, 1);
    assert_eq!(s.health.max_ejected_percent, 100);
}

#[test]
fn ipv6_listen() {
    let config = ok(
        "[[service]]\nname = \"v6\"\nlisten = [\"[::1]:8080\", \"[fe80::1%2]:8080\"]\nsrv = \"_http._tcp.example.com\"\n",
    );
    assert_eq!(config.services[0].listen[0], addr("[::1]:8080"));
    assert!(config.services[0].listen[1].is_ipv6());
}

#[test]
fn durations_parse_table() {
    let good = [
        ("0s", 0),
        ("250ms", 250),
        ("2s", 2_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("1h30m", 5_400_000),
        ("1m30s", 90_000),
        ("2s500ms", 2_500),
        ("1h2m3s4ms", 3_723_004),
        ("90s", 90_000),
    ];
    for (text, ms) in good {
        assert_eq!(
            parse_duration(text),
            Ok(Duration::from_millis(ms)),
            "{text}"
        );
    }
    let bad = [
        ("", "empty duration"),
        ("5", "has no unit"),
        ("-5s", "negative"),
        ("1.5s", "not a whole number"),
        ("5d", "unknown unit \"d\""),
        ("5 s", "unknown unit \" s\""),
        ("s", "does not start a group with a number"),
        ("30m1h", "largest to smallest"),
        ("1s1s", "largest to smallest"),
        ("99999999999999999999s", "too large"),
        ("9999999999999999h", "too large"),
    ];
    for (text, reason) in bad {
        match parse_duration(text) {
            Ok(d) => panic!("{text:?} parsed as {d:?}"),
            Err(e) => assert!(e.contains(reason), "{text:?}: {e}"),
        }
    }
}

#[test]
fn durations_format_as_written() {
    for text in ["0s", "250ms", "2s", "1m30s", "1h", "1h30m", "2s500ms"] {
        let parsed = parse_duration(text).unwrap();
        assert_eq!(format_duration(parsed), text);
    }
    assert_eq!(format_duration(Duration::from_secs(60)), "1m");
}

#[test]
fn plan_mentions_every_service_and_listener() {
    let config = ok(&format!(
        "{SERVICE}\n[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:8080\", \"[::1]:8080\"]\nsrv = \"_http._tcp.example.com\"\nbalance = \"p2c\"\n"
    ));
    let plan = config.plan();
    for needle in [
        "t.toml: 2 services, 3 listeners",
        "service \"pg\"",
        "service \"web\"",
        "127.0.0.1:5432",
        "127.0.0.1:8080",
        "[::1]:8080",
        "static 10.0.0.5:5432",
        "SRV _http._tcp.example.com via system resolver",
        "maglev, keyed by client IP",
        "p2c",
        "record TTL, clamped to 1s..1m",
        "timeout 2s, up to 2 retries",
        "eject after 3 consecutive",
        "admin              none",
    ] {
        assert!(plan.contains(needle), "plan lacks {needle:?}:\n{plan}");
    }
    // Continuation lines line up under the first value.
    assert!(
        plan.contains("  listen             127.0.0.1:8080\n                     [::1]:8080\n"),
        "{plan}"
    );
}

#[test]
fn same_discovery_ignores_static_order_and_name_case() {
    let config = ok(
        "[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\nsrv = \"_x._tcp.Example.com\"\nstatic = [\"10.0.0.1:1\", \"10.0.0.2:1\"]\n\
         [[service]]\nname = \"b\"\nlisten = [\"127.0.0.1:2\"]\nsrv = \"_x._tcp.example.COM\"\nstatic = [\"10.0.0.2:1\", \"10.0.0.1:1\"]\n\
         [[service]]\nname = \"c\"\nlisten = [\"127.0.0.1:3\"]\nsrv = \"_x._tcp.example.com\"\nstatic = [\"10.0.0.1:1\"]\n\
         [[service]]\nname = \"d\"\nlisten = [\"127.0.0.1:4\"]\nstatic = [\"10.0.0.1:1\", \"10.0.0.2:1\"]\n",
    );
    let s = &config.services;
    assert!(s[0].same_discovery(&s[1]));
    assert!(!s[0].same_discovery(&s[2]));
    assert!(!s[0].same_discovery(&s[3]));
}
