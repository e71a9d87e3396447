//! Rejected configurations: each test checks the whole message with its file, line and
//! column, since that line is what an operator reads.

use super::*;

#[test]
fn unknown_key_names_it_and_lists_valid_ones() {
    let e = err(&format!("{SERVICE}balanse = \"p2c\"\n"));
    assert!(
        e.starts_with(
            "t.toml:5:1: service \"pg\": unknown field `balanse`, expected one of `name`"
        ),
        "{e}"
    );
    assert!(e.contains("`balance`"), "{e}");
}

#[test]
fn unknown_key_in_health_and_top_level() {
    let e = err(&format!(
        "{SERVICE}[service.health]\nmax_ejections = \"1m\"\n"
    ));
    assert!(
        e.starts_with("t.toml:6:1: service \"pg\": unknown field `max_ejections`"),
        "{e}"
    );
    let e = err(&format!("[globals]\nadmin = \"127.0.0.1:1\"\n{SERVICE}"));
    assert_eq!(
        e,
        "t.toml:1:2: unknown field `globals`, expected one of `global`, `resolver`, `service`"
    );
    let e = err(&format!("[resolver]\nnameserver = []\n{SERVICE}"));
    assert!(
        e.starts_with("t.toml:2:1: unknown field `nameserver`"),
        "{e}"
    );
}

#[test]
fn unknown_key_suggests_the_near_key_or_its_table() {
    let e = err(&format!("{SERVICE}balanse = \"p2c\"\n"));
    assert!(e.ends_with("`health`; did you mean `balance`?"), "{e}");
    let e = err(&format!("[resolver]\nnameserver = []\n{SERVICE}"));
    assert!(e.ends_with("; did you mean `nameservers`?"), "{e}");
    let e = err(&format!(
        "{SERVICE}[service.health]\nmax_ejections = \"1m\"\n"
    ));
    assert!(e.ends_with("; did you mean `max_ejection`?"), "{e}");
    // Right key, wrong table.
    let e = err(&format!("{SERVICE}consecutive_failures = 3\n"));
    assert!(
        e.starts_with("t.toml:5:1: service \"pg\": unknown field `consecutive_failures`")
            && e.ends_with("; `consecutive_failures` belongs in [service.health]"),
        "{e}"
    );
    let e = err(&format!(
        "{SERVICE}[service.healht]\nmax_ejection = \"1m\"\n"
    ));
    assert!(e.ends_with("; did you mean `health`?"), "{e}");
    let e = err(&format!("[global]\ntimeout = \"1s\"\n{SERVICE}"));
    assert!(e.ends_with("; `timeout` belongs in [resolver]"), "{e}");
    // Nothing close: toml's list of valid keys alone.
    let e = err(&format!("{SERVICE}bogus = 1\n"));
    assert!(
        e.ends_with("`accept_proxy_from`, `data_path`, `health`"),
        "{e}"
    );
}

#[test]
fn unnamed_service_errors_use_its_position() {
    let e = err(&format!(
        "{SERVICE}[[service]]\nlisten = [\"127.0.0.1:1\"]\nbogus = 1\n"
    ));
    assert!(
        e.starts_with("t.toml:7:1: service #2: unknown field `bogus`"),
        "{e}"
    );
    let e = err(&format!(
        "{SERVICE}[[service]]\nlisten = [\"127.0.0.1:1\"]\n"
    ));
    assert_eq!(e, "t.toml:5:1: service #2: name is required");
}

#[test]
fn syntax_and_type_errors_keep_tomls_location() {
    let e = err("[[service]]\nname = \"pg\nlisten = []\n");
    assert!(e.starts_with("t.toml:2:"), "{e}");
    let e = err(&format!("{SERVICE}connect_retries = \"two\"\n"));
    assert!(
        e.starts_with("t.toml:5:19: service \"pg\": invalid type: string \"two\""),
        "{e}"
    );
}

#[test]
fn bad_duration() {
    let e = err(&format!("{SERVICE}connect_timeout = \"2 seconds\"\n"));
    assert_eq!(
        e,
        "t.toml:5:19: service \"pg\": connect_timeout: unknown unit \" seconds\" in \"2 seconds\"; expected a duration like \"250ms\", \"2s\" or \"5m\""
    );
    let e = err(&format!("[global]\nshutdown_grace = 30\n{SERVICE}"));
    assert_eq!(
        e,
        "t.toml:2:18: global.shutdown_grace: 30 has no unit; expected a duration like \"250ms\", \"2s\" or \"5m\""
    );
    let e = err(&format!(
        "{SERVICE}[service.health]\nmax_ejection = \"-1m\"\n"
    ));
    assert!(
        e.starts_with(
            "t.toml:6:16: service \"pg\": health.max_ejection: negative durations are not allowed;"
        ),
        "{e}"
    );
    let e = err(&format!("[resolver]\ntimeout = \"\"\n{SERVICE}"));
    assert!(
        e.starts_with("t.toml:2:11: resolver.timeout: empty duration;"),
        "{e}"
    );
}

#[test]
fn tcp_keepalive_is_a_duration_or_a_switch() {
    let keepalive = |line: &str| ok(&format!("{SERVICE}{line}")).services[0].tcp_keepalive;
    assert_eq!(keepalive(""), Some(Duration::from_secs(30)));
    assert_eq!(
        keepalive("tcp_keepalive = true\n"),
        Some(Duration::from_secs(30))
    );
    assert_eq!(keepalive("tcp_keepalive = false\n"), None);
    assert_eq!(
        keepalive("tcp_keepalive = \"2m\"\n"),
        Some(Duration::from_secs(120))
    );
    assert_eq!(
        err(&format!("{SERVICE}tcp_keepalive = \"500ms\"\n")),
        "t.toml:5:17: service \"pg\": tcp_keepalive: must be between 1s and 32767s, or false to turn it off"
    );
    assert!(
        err(&format!("{SERVICE}tcp_keepalive = 30\n"))
            .starts_with("t.toml:5:17: service \"pg\": tcp_keepalive: 30 has no unit;"),
    );
}

#[test]
fn accept_proxy_is_a_switch_with_a_timeout() {
    assert_eq!(
        err(&format!("{SERVICE}accept_proxy = \"yes\"\n")),
        "t.toml:5:16: service \"pg\": accept_proxy: expected true or false, not \"yes\""
    );
    assert!(
        err(&format!("{SERVICE}accept_proxy_timeout = \"0s\"\n"))
            .starts_with("t.toml:5:24: service \"pg\": accept_proxy_timeout"),
    );
}

#[test]
fn per_source_limits() {
    let c = ok(&format!(
        "{SERVICE}max_connections_per_source = 20\nrate_per_source = \"50/s\"\n"
    ));
    let s = &c.services[0];
    assert_eq!(s.max_connections_per_source, Some(20));
    assert_eq!(
        s.rate_per_source,
        Some(RatePerSource {
            count: 50,
            per: Duration::from_secs(1),
            burst: 50
        })
    );
    let c = ok(&format!(
        "{SERVICE}rate_per_source = \"100/10s\"\nrate_per_source_burst = 300\n"
    ));
    assert_eq!(
        c.services[0].rate_per_source,
        Some(RatePerSource {
            count: 100,
            per: Duration::from_secs(10),
            burst: 300
        })
    );
    assert!(
        c.plan().contains("100 new per 10s (burst 300) per source"),
        "{}",
        c.plan()
    );
    assert!(
        err(&format!("{SERVICE}rate_per_source = \"50\"\n"))
            .starts_with("t.toml:5:19: service \"pg\": rate_per_source: \"50\" has no \"/\";"),
    );
    assert!(
        err(&format!("{SERVICE}rate_per_source = \"0/s\"\n")).starts_with(
            "t.toml:5:19: service \"pg\": rate_per_source: \"0\" is not a whole number"
        ),
    );
    assert!(err(&format!("{SERVICE}rate_per_source = \"5/0s\"\n")).contains("the period is zero"),);
    assert_eq!(
        err(&format!("{SERVICE}rate_per_source_burst = 3\n")),
        "t.toml:5:25: service \"pg\": rate_per_source_burst needs rate_per_source"
    );
    assert!(
        err(&format!("{SERVICE}max_connections_per_source = 0\n"))
            .starts_with("t.toml:5:30: service \"pg\": max_connections_per_source"),
    );
}

#[test]
fn bad_addresses() {
    let e =
        err("[[service]]\nname = \"pg\"\nlisten = [\"127.0.0.1:1\", \"db:5432\"]\nsrv = \"a.b\"\n");
    assert_eq!(
        e,
        "t.toml:3:26: service \"pg\": listen address \"db:5432\" is not an IP:port address like \"127.0.0.1:5432\" or \"[::1]:5432\" (host names are not resolved here; use srv)"
    );
    let e =
        err("[[service]]\nname = \"pg\"\nlisten = [\"127.0.0.1:1\"]\nstatic = [\"10.0.0.1\"]\n");
    assert_eq!(
        e,
        "t.toml:4:11: service \"pg\": static backend \"10.0.0.1\" has no port; write \"10.0.0.1:PORT\""
    );
    let e = err("[[service]]\nname = \"pg\"\nlisten = [\"[::1]:0\"]\nsrv = \"a.b\"\n");
    assert_eq!(
        e,
        "t.toml:3:11: service \"pg\": listen address \"[::1]:0\": port 0 is not allowed"
    );
    let e = err(&format!("[global]\nadmin = \"localhost:9901\"\n{SERVICE}"));
    assert!(
        e.starts_with("t.toml:2:9: global.admin \"localhost:9901\" is not an IP:port"),
        "{e}"
    );
    let e = err(&format!(
        "[resolver]\nnameservers = [\"1.1.1.1\", \"dns.google\"]\n{SERVICE}"
    ));
    assert!(
        e.starts_with("t.toml:2:27: resolver.nameservers: \"dns.google\" is not an IP address"),
        "{e}"
    );
}

#[test]
fn bad_cidr() {
    let e = err(&format!(
        "{SERVICE}allow = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n"
    ));
    assert_eq!(
        e,
        "t.toml:5:24: service \"pg\": allow: \"10.0.0.0/33\" is not a network like \"10.0.0.0/8\" or \"2001:db8::/32\", or a single IP address"
    );
    let e = err(&format!("{SERVICE}deny = [\"10.1.2.3/8\"]\n"));
    assert_eq!(
        e,
        "t.toml:5:9: service \"pg\": deny: \"10.1.2.3/8\" has host bits set; did you mean \"10.0.0.0/8\"?"
    );
}

#[test]
fn service_needs_a_discovery_source() {
    let e = err("[[service]]\nname = \"pg\"\nlisten = [\"127.0.0.1:1\"]\n");
    assert!(
        e.starts_with("t.toml:1:1: service \"pg\": no discovery source: set srv"),
        "{e}"
    );
    let e = err("[[service]]\nname = \"pg\"\nlisten = [\"127.0.0.1:1\"]\nstatic = []\n");
    assert!(
        e.starts_with("t.toml:4:10: service \"pg\": no discovery source"),
        "{e}"
    );
}

#[test]
fn listen_required_and_not_empty() {
    let e = err("\n[[service]]\nname = \"pg\"\nsrv = \"a.b\"\n");
    assert_eq!(
        e,
        "t.toml:2:1: service \"pg\": listen is required, e.g. listen = [\"127.0.0.1:5432\"]"
    );
    let e = err("[[service]]\nname = \"pg\"\nsrv = \"a.b\"\nlisten = []\n");
    assert_eq!(e, "t.toml:4:10: service \"pg\": listen must not be empty");
}

#[test]
fn duplicate_listen_addresses() {
    let e = err(
        "[[service]]\nname = \"pg\"\nsrv = \"a.b\"\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n",
    );
    assert_eq!(
        e,
        "t.toml:4:26: service \"pg\": listen address 127.0.0.1:1 is listed twice"
    );
    let e = err(&format!(
        "{SERVICE}[[service]]\nname = \"web\"\nsrv = \"a.b\"\nlisten = [\"127.0.0.1:5432\"]\n"
    ));
    assert_eq!(
        e,
        "t.toml:8:11: service \"web\": listen address 127.0.0.1:5432 is already used by service \"pg\""
    );
    let e = err(&format!(
        "{SERVICE}[[service]]\nname = \"web\"\nsrv = \"a.b\"\nlisten = [\"0.0.0.0:5432\"]\n"
    ));
    assert!(e.starts_with("t.toml:8:11: service \"web\": listen address 0.0.0.0:5432 overlaps 127.0.0.1:5432 of service \"pg\""), "{e}");
    // Same port in the other address family is fine (the proxy binds v6 sockets v6-only).
    ok(&format!(
        "{SERVICE}[[service]]\nname = \"web\"\nsrv = \"a.b\"\nlisten = [\"[::]:5432\"]\n"
    ));
    let e = err(&format!("[global]\nadmin = \"127.0.0.1:5432\"\n{SERVICE}"));
    assert_eq!(
        e,
        "t.toml:2:9: global.admin 127.0.0.1:5432 collides with listen address 127.0.0.1:5432 of service \"pg\""
    );
}

#[test]
fn duplicate_static_backend() {
    let e = err(
        "[[service]]\nname = \"pg\"\nlisten = [\"127.0.0.1:1\"]\nstatic = [\"10.0.0.1:1\", \"10.0.0.1:1\"]\n",
    );
    assert_eq!(
        e,
        "t.toml:4:25: service \"pg\": static backend 10.0.0.1:1 is listed twice"
    );
}

#[test]
fn service_names() {
    let e = err(&format!(
        "{SERVICE}[[service]]\nname = \"pg\"\nsrv = \"a.b\"\nlisten = [\"127.0.0.1:2\"]\n"
    ));
    assert_eq!(
        e,
        "t.toml:6:8: service \"pg\": name is already used by the service on line 2"
    );
    let e = err("[[service]]\nname = \"\"\nsrv = \"a.b\"\nlisten = [\"127.0.0.1:2\"]\n");
    assert_eq!(e, "t.toml:2:8: service #1: name must not be empty");
    let e = err("[[service]]\nname = \"my db\"\nsrv = \"a.b\"\nlisten = [\"127.0.0.1:2\"]\n");
    assert_eq!(
        e,
        "t.toml:2:8: service #1: name \"my db\" may only contain letters, digits, '-', '_' and '.'"
    );
}

#[test]
fn invalid_srv_names() {
    let cases = [
        ("_pg._tcp..consul", "empty label"),
        ("_pg._tcp.db consul", "character ' ' is not allowed"),
        ("-x.example.com", "starts or ends with '-'"),
        ("10.0.0.5:5432", "fixed backends go in static"),
        ("", "it is empty"),
    ];
    for (name, reason) in cases {
        let e = err(&format!(
            "[[service]]\nname = \"pg\"\nlisten = [\"127.0.0.1:1\"]\nsrv = \"{name}\"\n"
        ));
        let expected =
            format!("t.toml:4:7: service \"pg\": srv {name:?} is not a valid DNS name: ");
        assert!(e.starts_with(&expected) && e.contains(reason), "{e}");
    }
    let long = format!("{}.com", "a".repeat(64));
    let e = err(&format!(
        "[[service]]\nname = \"pg\"\nlisten = [\"127.0.0.1:1\"]\nsrv = \"{long}\"\n"
    ));
    assert!(e.ends_with("is longer than 63 characters"), "{e}");
}

#[test]
fn resolver_family_is_any_ipv4_or_ipv6() {
    for (word, family) in [
        ("any", AddressFamily::Any),
        ("ipv4", AddressFamily::Ipv4),
        ("ipv6", AddressFamily::Ipv6),
    ] {
        let config = ok(&format!("[resolver]\nfamily = \"{word}\"\n{SERVICE}"));
        assert_eq!(config.resolver.family, family);
        let row = format!("  family{}{word}", " ".repeat(13));
        assert!(config.plan().contains(&row), "{}", config.plan());
    }
    let e = err(&format!("[resolver]\nfamily = \"v4\"\n{SERVICE}"));
    assert_eq!(
        e,
        "t.toml:2:10: resolver.family must be \"any\", \"ipv4\" or \"ipv6\", not \"v4\""
    );
}

#[test]
fn keywords_must_be_allowed_words() {
    let e = err(&format!("{SERVICE}balance = \"roundrobin\"\n"));
    assert_eq!(
        e,
        "t.toml:5:11: service \"pg\": balance must be \"maglev\" or \"p2c\", not \"roundrobin\""
    );
    let e = err(&format!("{SERVICE}hash_key = 1\n"));
    assert_eq!(
        e,
        "t.toml:5:12: service \"pg\": hash_key must be \"client_ip\" or \"client_ip_port\", not 1"
    );
    let e = err(&format!("{SERVICE}data_path = \"uring\"\n"));
    assert_eq!(
        e,
        "t.toml:5:13: service \"pg\": data_path must be \"epoll\" or \"io_uring\", not \"uring\""
    );
    let e = err(&format!("{SERVICE}send_proxy = \"V2\"\n"));
    assert_eq!(
        e,
        "t.toml:5:14: service \"pg\": send_proxy must be \"v1\" or \"v2\", not \"V2\""
    );
    let e = err(&format!("[global]\nlog_format = \"xml\"\n{SERVICE}"));
    assert_eq!(
        e,
        "t.toml:2:14: global.log_format must be \"text\" or \"json\", not \"xml\""
    );
}

#[test]
fn ordered_durations() {
    let e = err(&format!(
        "[resolver]\nmin_refresh = \"5m\"\nmax_refresh = \"1m\"\n{SERVICE}"
    ));
    assert_eq!(
        e,
        "t.toml:2:15: resolver.min_refresh (5m) must not be longer than resolver.max_refresh (1m)"
    );
    let e = err(&format!("[resolver]\nmin_refresh = \"2m\"\n{SERVICE}"));
    assert_eq!(
        e,
        "t.toml:2:15: resolver.min_refresh (2m) must not be longer than resolver.max_refresh (1m, the default)"
    );
    let e = err(&format!(
        "{SERVICE}[service.health]\nmax_ejection = \"5s\"\n"
    ));
    assert_eq!(
        e,
        "t.toml:6:16: service \"pg\": health.base_ejection (10s, the default) must not be longer than health.max_ejection (5s)"
    );
}

#[test]
fn numeric_limits() {
    let e = err(&format!(
        "{SERVICE}[service.health]\nmax_ejected_percent = 101\n"
    ));
    assert_eq!(
        e,
        "t.toml:6:23: service \"pg\": health.max_ejected_percent must be at most 100, not 101"
    );
    let e = err(&format!(
        "{SERVICE}[service.health]\nconsecutive_failures = 0\n"
    ));
    assert_eq!(
        e,
        "t.toml:6:24: service \"pg\": health.consecutive_failures must be at least 1, not 0"
    );
    let e = err(&format!("{SERVICE}max_connections = 0\n"));
    assert_eq!(
        e,
        "t.toml:5:19: service \"pg\": max_connections must be at least 1, not 0"
    );
    let e = err(&format!("{SERVICE}max_connections = 5000000000\n"));
    assert_eq!(
        e,
        "t.toml:5:19: service \"pg\": max_connections 5000000000 is too large"
    );
    let e = err(&format!("{SERVICE}connect_retries = -1\n"));
    assert_eq!(
        e,
        "t.toml:5:19: service \"pg\": connect_retries must be at least 0, not -1"
    );
    let e = err(&format!("{SERVICE}connect_timeout = \"0ms\"\n"));
    assert_eq!(
        e,
        "t.toml:5:19: service \"pg\": connect_timeout must be greater than zero"
    );
}

#[test]
fn no_services() {
    assert_eq!(
        err("[global]\nlog_format = \"json\"\n"),
        "t.toml: no services defined; add at least one [[service]] table with name, listen and srv or static"
    );
    let e = err("service = []\n");
    assert!(e.starts_with("t.toml:1:11: no services defined"), "{e}");
}

#[test]
fn columns_count_characters_not_bytes() {
    // "é" is two bytes: the bad balance value is character 40 of the line but byte 41.
    // (balance is checked before hash_key, so the error lands after the "é".)
    let e = err(
        "service = [{ hash_key = \"é\", balance = \"x\", name = \"pg\", listen = [\"127.0.0.1:1\"], static = [\"10.0.0.1:1\"] }]\n",
    );
    assert!(
        e.starts_with("t.toml:1:40: service \"pg\": balance must be"),
        "{e}"
    );
    let text = "ab\né€x";
    assert_eq!(
        super::super::error::line_column(text, text.find('x').unwrap()),
        (2, 3)
    );
    assert_eq!(super::super::error::line_column(text, 0), (1, 1));
    assert_eq!(super::super::error::line_column(text, 3), (2, 1));
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let dir = std::env::temp_dir().join(format!("srvlb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("srvlb.toml");
    std::fs::write(&path, format!("{SERVICE}balance = \"rr\"\n")).unwrap();
    let e = Config::load(&path).unwrap_err();
    assert_eq!(e.location(), Some((5, 11)));
    assert!(
        e.to_string()
            .starts_with(&format!("{}:5:11: service \"pg\"", path.display())),
        "{e}"
    );
    std::fs::write(&path, SERVICE).unwrap();
    assert_eq!(Config::load(&path).unwrap().source, path);

    let missing = dir.join("missing.toml");
    let e = Config::load(&missing).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read: ", missing.display())),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn admin_socket_and_token_file_are_read_and_checked() {
    let dir = std::env::temp_dir().join(format!("srvlb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("admin.token");
    std::fs::write(&token, "abc-123\r\n").unwrap();
    let config = ok(&format!(
        "[global]\nadmin_socket = \"/run/srvlb/admin.sock\"\nadmin_token_file = \"{}\"\n{SERVICE}",
        token.display()
    ));
    assert_eq!(
        config.global.admin_socket,
        Some(PathBuf::from("/run/srvlb/admin.sock"))
    );
    let parsed = config.global.admin_token.expect("token");
    assert!(
        parsed.accepts(b"abc-123"),
        "the line ending is not part of it"
    );
    assert_eq!(parsed.path(), token.as_path());

    let long = format!("/{}", "s".repeat(107));
    let e = err(&format!("[global]\nadmin_socket = \"{long}\"\n{SERVICE}"));
    assert!(
        e.starts_with("t.toml:2:16: global.admin_socket: the path is 108 bytes long"),
        "{e}"
    );
    let e = err(&format!("[global]\nadmin_socket = \"\"\n{SERVICE}"));
    assert!(
        e.starts_with("t.toml:2:16: global.admin_socket: empty path"),
        "{e}"
    );

    std::fs::write(&token, "two words\n").unwrap();
    let e = err(&format!(
        "[global]\nadmin_token_file = \"{}\"\n{SERVICE}",
        token.display()
    ));
    assert!(
        e.starts_with("t.toml:2:20: global.admin_token_file: "),
        "{e}"
    );
    assert!(e.contains("one line of visible ASCII"), "{e}");
    let e = err(&format!(
        "[global]\nadmin_token_file = \"{}\"\n{SERVICE}",
        dir.join("none").display()
    ));
    assert!(e.contains("global.admin_token_file: cannot read"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
