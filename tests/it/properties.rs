//! Property tests (proptest) of the parts that take input from outside:
//! - the config parser and validator, on arbitrary text and on generated configs: an error
//!   that names file:line:col (or the file), or a plan, never a panic;
//! - the PROXY protocol v1/v2 code: the parser (`accept_proxy`) on arbitrary bytes never
//!   panics, a decision it makes is final (more bytes never change a header or a refusal),
//!   and what the writer (`send_proxy`) writes decodes to the addresses it was given.
//!
//! Pool building on arbitrary SRV answer sets is a unit property test beside the pool
//! (`src/pool/properties.rs`): it plays connections on backend counters the crate keeps to
//! itself.
//!
//! Case counts are kept small so the suite stays fast on 2 cores; PROPTEST_CASES overrides.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use srvlb::config::{Balance, Config, ConfigError, ProxyProtocol};
use srvlb::proxy::proxy_protocol::{self, Decoded, ProxyHeader};

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Failures print their minimal input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Configuration

const ORIGIN: &str = "prop.toml";

/// What any input must give: a config whose plan renders, or an error that names the file
/// and, when it has one, a line and column inside the text.
fn check_outcome(text: &str, outcome: Result<Config, ConfigError>) -> Result<(), TestCaseError> {
    match outcome {
        Ok(config) => {
            let plan = config.plan();
            prop_assert!(plan.starts_with("# srvlb plan for prop.toml"), "{plan}");
            prop_assert!(!config.services.is_empty());
        }
        Err(e) => {
            let shown = e.to_string();
            prop_assert!(shown.starts_with("prop.toml:"), "{shown}");
            prop_assert!(!shown.contains('\n'), "one line: {shown:?}");
            if let Some((line, column)) = e.location() {
                let lines = text.split('\n').count();
                prop_assert!(
                    (1..=lines).contains(&line),
                    "line {line} of {lines}: {shown}"
                );
                prop_assert!(column >= 1, "{shown}");
                prop_assert!(
                    shown.starts_with(&format!("prop.toml:{line}:{column}: ")),
                    "{shown}"
                );
            }
        }
    }
    Ok(())
}

/// A line of something like a srvlb config: known tables and keys, plausible and absurd
/// values, and plain noise.
fn config_line() -> impl Strategy<Value = String> {
    let header = prop::sample::select(vec![
        "[global]",
        "[resolver]",
        "[[service]]",
        "[service.health]",
        "[[service.health]]",
        "[service]",
        "[[global]]",
        "[bogus]",
        "[service",
        "[[service]",
    ])
    .prop_map(str::to_owned);
    let key = prop_oneof![
        prop::sample::select(vec![
            "admin",
            "log_format",
            "shutdown_grace",
            "nameservers",
            "timeout",
            "min_refresh",
            "max_refresh",
            "empty_hold",
            "name",
            "listen",
            "srv",
            "static",
            "balance",
            "hash_key",
            "connect_timeout",
            "idle_timeout",
            "connect_retries",
            "max_connections",
            "allow",
            "deny",
            "send_proxy",
            "consecutive_failures",
            "base_ejection",
            "max_ejection",
            "max_ejected_percent",
            "health.consecutive_failures",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,12}",
    ];
    let string = prop_oneof![
        prop::sample::select(vec![
            "127.0.0.1:5432",
            "[::1]:80",
            "0.0.0.0:0",
            "_pg._tcp.db.consul",
            "maglev",
            "p2c",
            "client_ip",
            "client_ip_port",
            "v1",
            "v2",
            "json",
            "text",
            "2s",
            "250ms",
            "0s",
            "99999999999h",
            "10.0.0.0/8",
            "::/0",
            "",
            ".",
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,16}",
    ];
    let value = prop_oneof![
        string.clone().prop_map(|s| format!("{s:?}")),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        prop::collection::vec(string.clone(), 0..4).prop_map(|v| format!("{v:?}")),
        (string, any::<u16>()).prop_map(|(s, n)| format!("{{ name = {s:?}, x = {n} }}")),
        "\\PC{0,12}",
    ];
    prop_oneof![
        3 => header,
        8 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => "\\PC{0,30}",
        1 => Just(String::new()),
    ]
}

fn config_text() -> impl Strategy<Value = String> {
    prop::collection::vec(config_line(), 0..24).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(cases(96))]

    #[test]
    fn config_like_text_gives_a_plan_or_a_located_error(text in config_text()) {
        let outcome = Config::parse(&text, ORIGIN);
        check_outcome(&text, outcome)?;
    }

    #[test]
    fn arbitrary_bytes_give_an_error_never_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let outcome = Config::parse(&text, ORIGIN);
        check_outcome(&text, outcome)?;
    }
}

/// One value of a generated service: valid ones with what they mean, or an invalid one.
#[derive(Debug, Clone)]
enum Field {
    Valid(&'static str, String),
    Invalid(&'static str, String),
}

/// A service's optional keys, each valid or (rarely) invalid.
fn service_fields() -> impl Strategy<Value = Vec<Field>> {
    let pick = |key: &'static str, valid: Vec<&'static str>, invalid: Vec<&'static str>| {
        prop_oneof![
            6 => prop::sample::select(valid).prop_map(move |v| Field::Valid(key, v.to_owned())),
            1 => prop::sample::select(invalid).prop_map(move |v| Field::Invalid(key, v.to_owned())),
        ]
    };
    (
        pick(
            "balance",
            vec!["\"maglev\"", "\"p2c\""],
            vec!["\"round-robin\"", "3", "\"\""],
        ),
        pick(
            "hash_key",
            vec!["\"client_ip\"", "\"client_ip_port\""],
            vec!["\"mac\""],
        ),
        pick(
            "connect_timeout",
            vec!["\"250ms\"", "\"2s\"", "\"1m\""],
            vec!["\"2 parsecs\"", "\"-1s\"", "true"],
        ),
        pick(
            "connect_retries",
            vec!["0", "1", "5"],
            vec!["-1", "\"two\"", "99999999999999"],
        ),
        pick(
            "max_connections",
            vec!["1", "100", "10000"],
            vec!["-5", "1.5", "\"many\""],
        ),
        pick("send_proxy", vec!["\"v1\"", "\"v2\""], vec!["\"v3\""]),
        pick(
            "allow",
            vec!["[\"10.0.0.0/8\"]", "[\"127.0.0.1\", \"::1\"]", "[]"],
            vec!["[\"10.0.0.0/33\"]", "[\"nonsense\"]"],
        ),
    )
        .prop_flat_map(|fields| {
            let all = vec![
                fields.0, fields.1, fields.2, fields.3, fields.4, fields.5, fields.6,
            ];
            let n = all.len();
            prop::sample::subsequence(all, 0..=n)
        })
}

proptest! {
    #![proptest_config(cases(96))]

    /// Generated configs of one to three services: with only valid values the config loads
    /// and says what was written; with invalid values the error points at the line of one
    /// of them (type errors are found before value checks, so not always the first).
    #[test]
    fn generated_configs_load_or_point_at_the_bad_line(
        services in prop::collection::vec(service_fields(), 1..4),
        admin in any::<bool>(),
    ) {
        let mut lines: Vec<String> = Vec::new();
        if admin {
            lines.push("[global]".into());
            lines.push("admin = \"127.0.0.1:9901\"".into());
        }
        let mut invalid_lines: Vec<usize> = Vec::new();
        let mut expected: Vec<BTreeMap<&str, String>> = Vec::new();
        for (i, fields) in services.iter().enumerate() {
            lines.push(String::new());
            lines.push("[[service]]".into());
            lines.push(format!("name = \"svc{i}\""));
            lines.push(format!("listen = [\"127.0.0.1:{}\"]", 20_000 + i));
            lines.push("srv = \"_app._tcp.example.\"".into());
            let mut want = BTreeMap::new();
            for field in fields {
                let (key, value) = match field {
                    Field::Valid(k, v) => {
                        want.insert(*k, v.clone());
                        (k, v)
                    }
                    Field::Invalid(k, v) => {
                        invalid_lines.push(lines.len() + 1);
                        (k, v)
                    }
                };
                lines.push(format!("{key} = {value}"));
            }
            expected.push(want);
        }
        let text = lines.join("\n");
        let outcome = Config::parse(&text, ORIGIN);
        match (invalid_lines.first(), &outcome) {
            (None, Ok(config)) => {
                prop_assert_eq!(config.services.len(), services.len());
                for (s, want) in config.services.iter().zip(&expected) {
                    if let Some(v) = want.get("max_connections") {
                        prop_assert_eq!(s.max_connections.to_string(), v.clone());
                    }
                    if let Some(v) = want.get("connect_retries") {
                        prop_assert_eq!(s.connect_retries.to_string(), v.clone());
                    }
                    if let Some(v) = want.get("balance") {
                        let balance = if v.contains("p2c") { Balance::P2c } else { Balance::Maglev };
                        prop_assert_eq!(s.balance, balance);
                    }
                    if let Some(v) = want.get("send_proxy") {
                        let version = if v.contains("v1") { ProxyProtocol::V1 } else { ProxyProtocol::V2 };
                        prop_assert_eq!(s.send_proxy, Some(version));
                    }
                }
            }
            (None, Err(e)) => prop_assert!(false, "valid config refused: {e}\n{text}"),
            (Some(_), Err(e)) => {
                let line = e.location().map(|(l, _)| l);
                prop_assert!(
                    line.is_some_and(|l| invalid_lines.contains(&l)),
                    "error {} should point at one of lines {:?}:\n{}", e, invalid_lines, text
                );
            }
            (Some(line), Ok(_)) => prop_assert!(false, "line {line} is invalid but accepted:\n{text}"),
        }
        check_outcome(&text, outcome)?;
    }
}

// ---------------------------------------------------------------------------------------
// PROXY protocol

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(addr, |v4| SocketAddr::new(IpAddr::V4(v4), addr.port())),
        IpAddr::V4(_) => addr,
    }
}

/// Any address, with IPv4-mapped IPv6 ones (a v4 client on a v6 listener) well represented.
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port))),
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| {
            SocketAddr::from((Ipv4Addr::from(ip).to_ipv6_mapped(), port))
        }),
    ]
}

/// Bytes a PROXY parser meets: anything, or a real signature followed by anything (so the
/// cases get past the signature check), or a real header cut or followed by payload.
fn proxy_input() -> impl Strategy<Value = Vec<u8>> {
    let tail = prop::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        tail.clone().prop_map(|t| [&V2_SIGNATURE[..], &t].concat()),
        (tail.clone(), 0x20u8..0x22, 0u8..0x40)
            .prop_map(|(t, cmd, fam)| { [&V2_SIGNATURE[..], &[cmd, fam], &t].concat() }),
        "[ -~]{0,40}".prop_map(|t| format!("PROXY {t}").into_bytes()),
        "(TCP4|TCP6|UNKNOWN) [0-9a-f.:]{0,40} [0-9a-f.:]{0,40} [0-9]{0,6} [0-9]{0,6}(\r\n)?"
            .prop_map(|t| format!("PROXY {t}").into_bytes()),
        (
            socket_addr(),
            socket_addr(),
            any::<bool>(),
            any::<prop::sample::Index>(),
            tail
        )
            .prop_map(|(c, l, v1, cut, t)| {
                let version = if v1 {
                    ProxyProtocol::V1
                } else {
                    ProxyProtocol::V2
                };
                let h = proxy_protocol::header(version, c, l);
                let keep = cut.index(h.len() + 1);
                [&h[..keep], &t].concat()
            }),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn proxy_headers_decode_to_the_addresses_given(
        client in socket_addr(),
        local in socket_addr(),
        payload in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let (c, l) = (unmapped(client), unmapped(local));
        let expected = (c.is_ipv4() == l.is_ipv4()).then_some((c, l));
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let header = proxy_protocol::header(version, client, local);
            if version == ProxyProtocol::V1 {
                prop_assert!(header.len() <= 107, "v1 line of {} bytes", header.len());
            }
            let with_payload = [&header[..], &payload].concat();
            prop_assert_eq!(
                proxy_protocol::decode(&with_payload),
                Decoded::Header {
                    header: ProxyHeader { version, addresses: expected },
                    length: header.len(),
                },
                "{:02x?}", header
            );
            // Every strict prefix is a header still arriving.
            for cut in 0..header.len() {
                prop_assert_eq!(
                    proxy_protocol::decode(&header[..cut]),
                    Decoded::Incomplete,
                    "{:?} cut to {}", version, cut
                );
            }
        }
    }

    /// On any input the parser answers without panicking, and its answer is final: only
    /// `Incomplete` may change when more bytes arrive; a header is as long as it says and
    /// decodes alone to the same.
    #[test]
    fn the_proxy_parser_decides_once_on_arbitrary_bytes(
        bytes in proxy_input(),
        more in prop::collection::vec(any::<u8>(), 1..16),
    ) {
        let decoded = proxy_protocol::decode(&bytes);
        let extended = proxy_protocol::decode(&[&bytes[..], &more].concat());
        match &decoded {
            Decoded::Header { length, .. } => {
                prop_assert!(*length <= bytes.len());
                prop_assert_eq!(&proxy_protocol::decode(&bytes[..*length]), &decoded);
                prop_assert_eq!(&extended, &decoded, "more bytes changed a header");
            }
            Decoded::Invalid(_) => {
                prop_assert_eq!(&extended, &decoded, "more bytes changed a refusal");
            }
            Decoded::Incomplete => {
                prop_assert!(bytes.len() < 16 + 65_535 + 107, "incomplete forever");
            }
        }
    }
}
