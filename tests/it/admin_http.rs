//! What an operator sees of the admin endpoint beyond its hardening (`admin.rs`): /metrics
//! parses as Prometheus text and its connection histograms count the connections made, the
//! process and build-info series are there, OpenMetrics is served to a scraper that asks
//! for it, the unix socket serves the same endpoint, and the bearer token guards everything
//! but /healthz, is rotated by a reload, and is refused by `srvlb check` when unusable.

use crate::support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use support::harness::{Mode, Srvlb, TestBackend, eventually, free_port, temp_dir};

/// One request on `stream` (closed by the server after the answer): status line, headers
/// (lower-cased names) and body.
fn exchange(
    mut stream: impl Read + Write,
    request: &str,
) -> (String, HashMap<String, String>, String) {
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let mut lines = head.lines();
    let status = lines.next().unwrap_or("").to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn get(admin: SocketAddr, path: &str, extra: &str) -> (String, HashMap<String, String>, String) {
    let stream = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    exchange(
        stream,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n"),
    )
}

fn config(admin: SocketAddr, listen: SocketAddr, backend: SocketAddr, global: &str) -> String {
    format!(
        "[global]\nadmin = \"{admin}\"\nshutdown_grace = \"1s\"\n{global}\n\n[[service]]\n\
         name = \"app\"\nlisten = [\"{listen}\"]\nstatic = [\"{backend}\"]\n"
    )
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A sample of the Prometheus text format: name, labels in order, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses the whole body as the Prometheus text format (0.0.4) strictly enough to catch
/// what a scraper would reject: every sample belongs to a family declared by `# TYPE`
/// before it, names and label names are valid, values are numbers, no series repeats.
fn parse_prometheus(body: &str) -> (HashMap<String, String>, Vec<Sample>) {
    let mut types = HashMap::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "untyped", "summary"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value of {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("closing brace");
                let labels = inner
                    .split("\",")
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                        assert!(valid_name(k), "label {k} in {line}");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(valid_name(name), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "no # TYPE before {line}");
        assert!(seen.insert(series.to_owned()), "series repeated: {series}");
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
                && s.labels
                    .iter()
                    .all(|(k, _)| k == "le" || labels.iter().any(|(lk, _)| lk == k))
        })
        .map(|s| s.value)
}

/// The buckets of one histogram series rise, and `+Inf` equals `_count`.
fn check_buckets(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let buckets: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == format!("{name}_bucket")
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .collect();
    assert!(
        buckets.len() > 5,
        "{name}{labels:?}: {} buckets",
        buckets.len()
    );
    assert!(
        buckets.windows(2).all(|w| w[0].value <= w[1].value),
        "{name}: buckets fall"
    );
    let last = buckets.last().expect("buckets");
    assert!(
        last.labels.iter().any(|(k, v)| k == "le" && v == "+Inf"),
        "{name}: no +Inf"
    );
    let count = value(samples, &format!("{name}_count"), labels).expect("count");
    assert_eq!(last.value, count, "{name}: +Inf bucket != _count");
    count
}

#[test]
fn metrics_parse_and_histograms_count_the_connections_made() {
    let backend = TestBackend::start("b", Mode::Echo);
    let (admin, listen) = (addr(), addr());
    let _srvlb = Srvlb::start(&config(admin, listen, backend.addr, ""));
    const CONNECTIONS: usize = 7;
    let mut sent = 0usize;
    for i in 0..CONNECTIONS {
        let payload = vec![b'x'; 100 * (i + 1)];
        let mut client = TcpStream::connect_timeout(&listen, Duration::from_secs(5)).expect("c");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        client.write_all(&payload).expect("send");
        let mut echo = vec![0u8; payload.len()];
        client.read_exact(&mut echo).expect("echo");
        sent += payload.len();
    }
    let app = [("service", "app")];
    let scrape = || parse_prometheus(&get(admin, "/metrics", "").2);
    assert!(
        eventually(Duration::from_secs(10), || {
            value(
                &scrape().1,
                "srvlb_service_connection_duration_seconds_count",
                &app,
            ) == Some(CONNECTIONS as f64)
        }),
        "the duration histogram does not count {CONNECTIONS} closed connections"
    );
    let (status, headers, body) = get(admin, "/metrics", "");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        headers["content-type"].starts_with("text/plain; version=0.0.4"),
        "{headers:?}"
    );
    let (types, samples) = parse_prometheus(&body);
    for (name, labels) in [
        ("srvlb_service_connect_duration_seconds", &app[..]),
        ("srvlb_service_connection_duration_seconds", &app[..]),
        (
            "srvlb_service_connection_bytes",
            &[("service", "app"), ("direction", "sent")][..],
        ),
        (
            "srvlb_service_connection_bytes",
            &[("service", "app"), ("direction", "received")][..],
        ),
    ] {
        assert_eq!(types[name], "histogram");
        let count = check_buckets(&samples, name, labels);
        assert_eq!(count, CONNECTIONS as f64, "{name}{labels:?}");
    }
    let bytes_sum = |direction| {
        let labels = [("service", "app"), ("direction", direction)];
        value(&samples, "srvlb_service_connection_bytes_sum", &labels)
    };
    assert_eq!(bytes_sum("sent"), Some(sent as f64));
    assert_eq!(
        bytes_sum("received"),
        Some(sent as f64),
        "the echo sends it all back"
    );
    // The counters the histograms sit beside agree with them.
    assert_eq!(types["srvlb_service_connections_total"], "counter");
    assert_eq!(
        value(&samples, "srvlb_service_connections_total", &app),
        Some(CONNECTIONS as f64)
    );
    println!(
        "{} samples in {} families; connect time sum {:?} s",
        samples.len(),
        types.len(),
        value(&samples, "srvlb_service_connect_duration_seconds_sum", &app)
    );
}

#[test]
fn process_and_build_info_series_are_exported_and_openmetrics_is_negotiated() {
    let backend = TestBackend::start("b", Mode::Echo);
    let (admin, listen) = (addr(), addr());
    let srvlb = Srvlb::start(&config(admin, listen, backend.addr, ""));
    let (types, samples) = parse_prometheus(&get(admin, "/metrics", "").2);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(types["srvlb_build_info"], "gauge");
    assert_eq!(
        value(&samples, "srvlb_build_info", &[("version", version)]),
        Some(1.0)
    );
    let open = value(&samples, "process_open_fds", &[]).expect("process_open_fds");
    assert!(
        open >= 5.0 && open <= srvlb.fd_count() as f64 + 5.0,
        "{open}"
    );
    let rss = value(&samples, "process_resident_memory_bytes", &[]).expect("rss");
    assert!(rss > 1e6, "{rss}");
    assert_eq!(types["process_cpu_seconds_total"], "counter");
    let started = value(&samples, "process_start_time_seconds", &[]).expect("start time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        (now - 120.0..=now + 1.0).contains(&started),
        "started {started}, now {now}"
    );
    for name in [
        "process_max_fds",
        "process_virtual_memory_bytes",
        "process_threads",
    ] {
        assert!(value(&samples, name, &[]).is_some(), "{name} missing");
    }

    // A scraper that prefers OpenMetrics (Prometheus does) gets it.
    let accept =
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n";
    let (status, headers, body) = get(admin, "/metrics", accept);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        headers["content-type"].starts_with("application/openmetrics-text"),
        "{headers:?}"
    );
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    assert!(body.contains("# TYPE srvlb_service_connections counter\n"));
    assert!(body.contains("srvlb_service_connections_total{service=\"app\"} 0\n"));
}

#[test]
fn the_unix_socket_serves_the_endpoint_replaces_a_stale_file_and_is_removed_on_exit() {
    let backend = TestBackend::start("b", Mode::Echo);
    let (admin, listen) = (addr(), addr());
    let dir = temp_dir("admin-socket");
    let path = dir.join("admin.sock");
    // Left by a srvlb that was killed: a socket file nothing listens on.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    let global = format!("admin_socket = \"{}\"", path.display());
    let mut srvlb = Srvlb::start(&config(admin, listen, backend.addr, &global));
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    let unix_get = |p: &str| {
        let stream = UnixStream::connect(&path).expect("connect to the admin socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        exchange(
            stream,
            &format!("GET {p} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        )
    };
    let (status, _, body) = unix_get("/metrics");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (_, samples) = parse_prometheus(&body);
    assert_eq!(
        value(
            &samples,
            "srvlb_service_connections_total",
            &[("service", "app")]
        ),
        Some(0.0)
    );
    let (status, _, body) = unix_get("/status");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(status["services"][0]["name"], "app");
    // The TCP endpoint serves beside it.
    assert!(get(admin, "/healthz", "").0.starts_with("HTTP/1.1 200"));

    // A reload that moves the socket: the new path serves, the old file is gone.
    let moved = dir.join("moved.sock");
    let global = format!("admin_socket = \"{}\"", moved.display());
    srvlb.write_config(&config(admin, listen, backend.addr, &global));
    srvlb.signal("HUP");
    srvlb.wait_log("configuration reloaded", Duration::from_secs(10));
    assert!(!path.exists(), "the old socket file outlived the reload");
    let stream = UnixStream::connect(&moved).expect("connect to the moved socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (status, _, _) = exchange(stream, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    srvlb.signal("TERM");
    assert_eq!(srvlb.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!moved.exists(), "the socket file outlived srvlb");
}

fn write_token(dir: &Path, token: &str) -> std::path::PathBuf {
    let path = dir.join("admin.token");
    std::fs::write(&path, format!("{token}\n")).expect("write token");
    path
}

#[test]
fn a_bearer_token_guards_metrics_and_status_but_not_healthz_and_a_reload_rotates_it() {
    let backend = TestBackend::start("b", Mode::Echo);
    let (admin, listen) = (addr(), addr());
    let dir = temp_dir("admin-token");
    let token_path = write_token(&dir, "first-0123456789abcdef");
    let global = format!("admin_token_file = \"{}\"", token_path.display());
    let text = config(admin, listen, backend.addr, &global);
    let srvlb = Srvlb::start(&text);
    let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");
    for path in ["/metrics", "/status", "/nope"] {
        for extra in [
            String::new(),
            bearer("wrong"),
            bearer("first-0123456789abcde"),
        ] {
            let (status, headers, _) = get(admin, path, &extra);
            assert!(
                status.starts_with("HTTP/1.1 401"),
                "{path} {extra:?}: {status}"
            );
            assert!(
                headers["www-authenticate"].starts_with("Bearer"),
                "{headers:?}"
            );
        }
    }
    assert!(
        get(admin, "/healthz", "").0.starts_with("HTTP/1.1 200"),
        "/healthz stays open"
    );
    let (status, _, body) = get(admin, "/metrics", &bearer("first-0123456789abcdef"));
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (_, samples) = parse_prometheus(&body);
    assert_eq!(
        value(&samples, "srvlb_admin_unauthorized_total", &[]),
        Some(9.0)
    );
    // The scheme is case-insensitive, as RFC 9110 says.
    let lower = "Authorization: bearer first-0123456789abcdef\r\n";
    assert!(get(admin, "/status", lower).0.starts_with("HTTP/1.1 200"));

    // Rotation: a new token in the file and a SIGHUP; the old one stops working.
    write_token(&dir, "second-fedcba9876543210");
    srvlb.signal("HUP");
    srvlb.wait_log("configuration reloaded", Duration::from_secs(10));
    let (status, _, _) = get(admin, "/metrics", &bearer("first-0123456789abcdef"));
    assert!(
        status.starts_with("HTTP/1.1 401"),
        "old token after rotation: {status}"
    );
    let (status, _, _) = get(admin, "/metrics", &bearer("second-fedcba9876543210"));
    assert!(status.starts_with("HTTP/1.1 200"), "new token: {status}");

    // An emptied token file refuses the reload; the last token keeps working.
    std::fs::write(&token_path, "").expect("empty the token file");
    srvlb.signal("HUP");
    srvlb.wait_log("reload refused", Duration::from_secs(10));
    assert!(srvlb.log_contains("admin_token_file"), "{:?}", srvlb.log());
    let (status, _, _) = get(admin, "/metrics", &bearer("second-fedcba9876543210"));
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "after a refused reload: {status}"
    );
}

#[test]
fn check_prints_the_admin_keys_and_refuses_an_unusable_token_file() {
    let dir = temp_dir("admin-check");
    let check = |config: &str| {
        let path = dir.join("config.toml");
        std::fs::write(&path, config).expect("write config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_srvlb"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run srvlb check");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let service =
        "[[service]]\nname = \"app\"\nlisten = [\"127.0.0.1:1\"]\nstatic = [\"127.0.0.1:2\"]\n";
    let token = write_token(&dir, "t0ken");
    let socket = dir.join("admin.sock");
    let (code, plan) = check(&format!(
        "[global]\nadmin = \"127.0.0.1:9901\"\nadmin_socket = \"{}\"\nadmin_token_file = \"{}\"\n{service}",
        socket.display(),
        token.display()
    ));
    assert_eq!(code, Some(0), "{plan}");
    assert!(
        plan.contains(&format!(
            "admin socket       {} (mode 0660",
            socket.display()
        )),
        "{plan}"
    );
    assert!(
        plan.contains(&format!(
            "admin auth         bearer token from {} (5 bytes)",
            token.display()
        )),
        "{plan}"
    );
    assert!(
        !plan.contains("t0ken\n") && !plan.contains(" t0ken"),
        "the secret is never printed"
    );
    let (_, plan) = check(service);
    assert!(plan.contains("admin socket       none"), "{plan}");
    assert!(plan.contains("admin auth         none"), "{plan}");

    let missing = dir.join("missing.token");
    let (code, text) = check(&format!(
        "[global]\nadmin_token_file = \"{}\"\n{service}",
        missing.display()
    ));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(":2:20: global.admin_token_file: cannot read"),
        "{text}"
    );
    let empty = dir.join("empty.token");
    std::fs::write(&empty, "\n").expect("write");
    let (code, text) = check(&format!(
        "[global]\nadmin_token_file = \"{}\"\n{service}",
        empty.display()
    ));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(":2:20: global.admin_token_file:") && text.contains("is empty"),
        "{text}"
    );
}
