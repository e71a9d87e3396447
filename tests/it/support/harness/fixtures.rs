//! Ready-made set-ups: the in-process DNS server on a runtime of its own (`Dns`), and a srvlb
//! with one service over static backends (`StaticLb`).

use super::*;

/// The SRV name the in-process DNS fixture publishes by default.
pub const SRV_NAME: &str = "_app._tcp.srvlb.test.";

/// The host name a test backend is published under: `<name>.srvlb.test.`
pub fn srv_host(name: &str) -> String {
    format!("{name}.srvlb.test.")
}

/// A srvlb config whose services find their backends through the DNS server at `dns`
/// (a 1 s query timeout): `global` and `resolver` are more lines for those tables,
/// `services` the `[[service]]` tables (see [`srv_service`]).
pub fn dns_config(dns: SocketAddr, global: &str, resolver: &str, services: &str) -> String {
    format!(
        r#"
[global]
{global}

[resolver]
nameservers = ["{dns}"]
timeout = "1s"
{resolver}

{services}
"#
    )
}

/// A `[[service]]` table for `dns_config`: `name` listening on `listen`, its backends from
/// the SRV name `srv`, with a 1 s connect timeout; `extra` is more lines for the table.
pub fn srv_service(
    name: &str,
    listen: SocketAddr,
    srv: &str,
    balance: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[[service]]
name = "{name}"
listen = ["{listen}"]
srv = "{srv}"
balance = "{balance}"
connect_timeout = "1s"
{extra}
"#
    )
}

/// The in-process DNS server on a runtime of its own, for tests written with blocking
/// sockets. Stops when dropped.
pub struct Dns {
    runtime: tokio::runtime::Runtime,
    pub server: crate::support::dns::TestDns,
}

impl Dns {
    pub fn start() -> Dns {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime
            .block_on(crate::support::dns::TestDns::start())
            .expect("dns server");
        Dns { runtime, server }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Publishes `backends` (priority, weight) under SRV_NAME with a TTL of 1 s, each target
    /// `<name>.srvlb.test.` with A 127.0.0.1.
    pub fn publish(&self, backends: &[(&TestBackend, u16, u16)]) {
        self.publish_on(SRV_NAME, 1, backends);
    }

    pub fn publish_on(&self, srv: &str, ttl: u32, backends: &[(&TestBackend, u16, u16)]) {
        let named: Vec<(&str, u16, u16, u16)> = backends
            .iter()
            .map(|(b, priority, weight)| (b.name.as_str(), b.port(), *priority, *weight))
            .collect();
        self.publish_ports(srv, ttl, &named);
    }

    /// Like `publish_on` for backends given as (name, port, priority, weight), e.g. a
    /// `ManyEcho`.
    pub fn publish_ports(&self, srv: &str, ttl: u32, backends: &[(&str, u16, u16, u16)]) {
        let mut records = Vec::new();
        for (name, port, priority, weight) in backends {
            let host = srv_host(name);
            self.server
                .set_addrs(&host, 1, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
            records.push(crate::support::dns::Srv {
                priority: *priority,
                weight: *weight,
                port: *port,
                target: host,
            });
        }
        self.server.set_srv(srv, ttl, &records);
    }

    pub fn shutdown(&self) {
        self.runtime.block_on(self.server.shutdown());
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A running srvlb with one service "app" on `listen` over static `backends`, logging JSON
/// (so tests can read event fields) and with an admin endpoint to read state from.
pub struct StaticLb {
    pub srvlb: Srvlb,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl StaticLb {
    pub fn start(backends: &[SocketAddr], service: &str, health: &str) -> StaticLb {
        Self::start_with_env(backends, service, health, &[])
    }

    /// [`start`](Self::start) with extra environment for srvlb (e.g. `SRVLB_SPLICE=0`).
    pub fn start_with_env(
        backends: &[SocketAddr],
        service: &str,
        health: &str,
        env: &[(&str, &str)],
    ) -> StaticLb {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let statics = backends
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            r#"
[global]
admin = "{admin}"
log_format = "json"
shutdown_grace = "1s"

[[service]]
name = "app"
listen = ["{listen}"]
static = [{statics}]
{service}

[service.health]
{health}
"#
        );
        let lb = StaticLb {
            srvlb: Srvlb::start_with_env(&config, env),
            listen,
            admin,
        };
        // "srvlb ready" means the listeners are bound; the discovery task fills the pool
        // right after. Wait for it so a first connection is not refused for "no backend".
        let loaded = eventually(Duration::from_secs(10), || {
            let status: serde_json::Value =
                match serde_json::from_str(&http_get(lb.admin, "/status")) {
                    Ok(v) => v,
                    Err(_) => return false,
                };
            status["services"][0]["backends"]
                .as_array()
                .is_some_and(|bs| bs.len() == backends.len())
        });
        assert!(loaded, "srvlb never loaded its {} backends", backends.len());
        lb
    }

    /// The `fields` of every JSON log line whose message is `message`.
    pub fn events(&self, message: &str) -> Vec<serde_json::Value> {
        self.srvlb
            .log()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|v| v.get("fields").cloned())
            .filter(|f| f.get("message").and_then(serde_json::Value::as_str) == Some(message))
            .collect()
    }

    pub fn events_for(&self, message: &str, backend: SocketAddr) -> Vec<serde_json::Value> {
        let backend = backend.to_string();
        self.events(message)
            .into_iter()
            .filter(|f| {
                f.get("backend").and_then(serde_json::Value::as_str) == Some(backend.as_str())
            })
            .collect()
    }

    /// Waits for the first `message` event about `backend`; returns it and when it was seen.
    pub fn wait_event(
        &self,
        message: &str,
        backend: SocketAddr,
        timeout: Duration,
    ) -> (serde_json::Value, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.events_for(message, backend).into_iter().next() {
                return (event, Instant::now());
            }
            assert!(
                Instant::now() < deadline,
                "no {message:?} for {backend} within {timeout:?}; log:\n{}",
                self.srvlb.log().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A per-backend counter from /metrics.
    pub fn backend_metric(&self, name: &str, backend: SocketAddr) -> u64 {
        let needle = format!("backend=\"{backend}\"");
        let metrics = http_get(self.admin, "/metrics");
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} for {backend} in:\n{metrics}"))
    }

    /// A metric without labels (0 when srvlb does not export it on this platform).
    pub fn global_metric(&self, name: &str) -> u64 {
        let metrics = http_get(self.admin, "/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn service_metric(&self, name: &str) -> u64 {
        let metrics = http_get(self.admin, "/metrics");
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{service=\"app\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    }

    /// How many backends /status shows as ejected right now.
    pub fn ejected_now(&self) -> usize {
        let status: serde_json::Value =
            serde_json::from_str(&http_get(self.admin, "/status")).expect("status is JSON");
        status["services"][0]["backends"]
            .as_array()
            .map(|bs| bs.iter().filter(|b| b["state"] == "ejected").count())
            .unwrap_or(0)
    }

    /// Connections srvlb closed on the client because the backend ended them before any
    /// byte moved (a backend killed with connections still in its accept queue).
    pub fn unserved_by(&self, backend: SocketAddr) -> usize {
        self.events_for("connection closed", backend)
            .iter()
            .filter(|f| f["bytes_in"] == 0 && f["bytes_out"] == 0)
            .count()
    }

    /// The sum of a per-backend counter over all backends.
    pub fn backend_metric_sum(&self, name: &str) -> u64 {
        http_get(self.admin, "/metrics")
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// srvlb's log so far, one line per event, for failure messages.
    pub fn log(&self) -> String {
        self.srvlb.log().join("\n")
    }
}
