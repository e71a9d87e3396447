//! What the demo prints: headings, the spread of connections against the weights, the
//! configuration, and excerpts of the admin endpoint's /status and /metrics.

use super::*;

/// Prints the configuration srvlb runs with.
pub(super) fn print_config(toml: &str) {
    println!();
    println!("srvlb configuration (parsed with srvlb::config::Config::parse):");
    for line in toml.trim().lines() {
        println!("  | {line}");
    }
}

pub(super) fn heading(text: &str) {
    println!("{text}");
    println!("{}", "=".repeat(text.len()));
}

pub(super) fn section(text: &str) {
    println!();
    println!("{text}");
    println!("{}", "-".repeat(text.len()));
}

/// Connections per backend with the share a weight-proportional spread would give.
pub(super) fn print_spread(tally: &Tally, weights: &[(&EchoBackend, u16)]) {
    let total_weight: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
    let ok = tally.ok().max(1);
    println!(
        "  {:<8} {:>6} {:>11} {:>7} {:>9}",
        "backend", "weight", "connections", "share", "expected"
    );
    let mut names: Vec<&str> = weights.iter().map(|(b, _)| b.name.as_str()).collect();
    for name in tally.by_backend.keys() {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    for name in names {
        let n = tally.by_backend.get(name).copied().unwrap_or(0);
        let weight = weights
            .iter()
            .find(|(b, _)| b.name == name)
            .map(|(_, w)| u64::from(*w));
        let expected = match weight {
            Some(w) if total_weight > 0 => {
                format!("{:.0}%", 100.0 * w as f64 / total_weight as f64)
            }
            _ => "-".to_owned(),
        };
        println!(
            "  {:<8} {:>6} {:>11} {:>6.1}% {:>9}",
            name,
            weight.map_or("-".to_owned(), |w| w.to_string()),
            n,
            100.0 * n as f64 / ok as f64,
            expected
        );
    }
    println!(
        "  {:<8} {:>6} {:>11}   failed: {}",
        "total",
        "",
        tally.ok(),
        tally.failures
    );
}

/// GET `path` from the admin endpoint; the body of a 200 answer.
pub(super) async fn http_get(admin: SocketAddr, path: &str) -> DemoResult<String> {
    let mut stream = TcpStream::connect(admin).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: srvlb\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8(response)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response from the admin endpoint")?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: admin endpoint answered {status_line:?}").into());
    }
    Ok(body.to_owned())
}

pub(super) async fn fetch_status(admin: SocketAddr) -> DemoResult<serde_json::Value> {
    Ok(serde_json::from_str(&http_get(admin, "/status").await?)?)
}

/// Prints the /metrics samples whose line starts with one of `names`.
pub(super) async fn print_metrics(admin: SocketAddr, names: &[&str]) -> DemoResult<()> {
    let body = http_get(admin, "/metrics").await?;
    for line in body.lines() {
        if !line.starts_with('#') && names.iter().any(|n| line.starts_with(n)) {
            println!("  {line}");
        }
    }
    Ok(())
}

/// One table per service: backend, priority, weight, state, connections, failures, reason.
pub(super) fn print_status(status: &serde_json::Value) -> DemoResult<()> {
    let services = status["services"]
        .as_array()
        .ok_or("/status has no services array")?;
    for service in services {
        println!(
            "  service {} ({}), DNS refreshes {}, stale {}",
            service["name"].as_str().unwrap_or("?"),
            service["balance"].as_str().unwrap_or("?"),
            service["dns"]["refreshes"],
            service["dns"]["stale"]
        );
        println!(
            "    {:<20} {:>4} {:>6}  {:<8} {:>5} {:>8}  reason",
            "target", "prio", "weight", "state", "conns", "failures"
        );
        let mut backends: Vec<&serde_json::Value> = service["backends"]
            .as_array()
            .map(|b| b.iter().collect())
            .unwrap_or_default();
        backends.sort_by_key(|b| {
            (
                b["priority"].as_u64().unwrap_or(0),
                b["target"].as_str().unwrap_or("").to_owned(),
            )
        });
        for b in backends {
            let mut reason = b["reason"].as_str().unwrap_or("").to_owned();
            if let Some(ms) = b["ejected_for_ms"].as_u64() {
                reason = format!("{reason}; back in {:.0}s", ms as f64 / 1000.0);
            }
            let number = |key: &str| b[key].as_u64().map_or("?".to_owned(), |n| n.to_string());
            println!(
                "    {:<20} {:>4} {:>6}  {:<8} {:>5} {:>8}  {}",
                b["target"].as_str().unwrap_or("?"),
                number("priority"),
                number("weight"),
                b["state"].as_str().unwrap_or("?"),
                number("connections"),
                number("connect_failures"),
                reason
            );
        }
    }
    Ok(())
}
