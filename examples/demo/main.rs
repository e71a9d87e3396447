//! srvlb end to end in one process, with nothing installed: `cargo run --release --example demo`.
//!
//! It starts an authoritative DNS server (the one the integration tests use), a few echo
//! backends published as SRV records, and srvlb itself through the library (the same code as
//! the `srvlb` binary). Then it drives clients through a `maglev` and a `p2c` service, kills a
//! backend, changes the DNS records, and prints what srvlb did at each step: how connections
//! spread, which client stays where, what `/status` on the admin endpoint says.
//!
//! Linux only: maglev is keyed by the client address, so clients bind to 127.0.0.2,
//! 127.0.0.3, ... (the whole 127.0.0.0/8 is loopback on Linux).

#[path = "../../tests/it/support/dns.rs"]
mod dns;
mod output;
mod traffic;

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dns::{Srv, TestDns};
use output::*;
use srvlb::config::Config;
use srvlb::control::Server;
use srvlb::service::Service;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing_subscriber::EnvFilter;
use traffic::*;

type DemoError = Box<dyn Error + Send + Sync>;
type DemoResult<T> = Result<T, DemoError>;

const ZONE: &str = "demo.test.";
const SRV_NAME: &str = "_echo._tcp.demo.test.";
/// TTL of every record: srvlb refreshes on the TTL (clamped to min_refresh = 1s).
const TTL: u32 = 1;
const MAGLEV: &str = "web-maglev";
const P2C: &str = "web-p2c";
/// Client addresses for the maglev service: 127.0.0.2 ..= 127.0.0.201.
const CLIENTS: u8 = 200;
/// How long one client exchange (connect, greeting, echo) may take.
const VISIT_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    init_logging();
    let started = Instant::now();
    let result = run().await;
    match result {
        Ok(summary) => {
            println!();
            println!("Done in {:.1}s. {summary}", started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => Err(format!("demo failed: {e}").into()),
    }
}

/// srvlb's warnings (connect failures, ejections) and discovery changes, on stdout so they
/// interleave with the demo's own output in order. SRVLB_LOG overrides the filter.
fn init_logging() {
    let filter = EnvFilter::try_from_env("SRVLB_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,srvlb::discovery=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .init();
}

async fn run() -> DemoResult<String> {
    heading("srvlb demo: a Layer-4 TCP load balancer whose backends come from DNS SRV records");
    check_loopback_range()?;
    let mut demo = Demo::set_up().await?;
    // The traffic of steps 2 to 5: anonymous clients for p2c, one per address for maglev.
    let sources = vec![None; 400];
    let clients: Vec<Option<Ipv4Addr>> = (0..CLIENTS).map(|i| Some(client_ip(i))).collect();
    demo.p2c_spread(&sources).await;
    let before = demo.maglev_spread(&clients).await;
    demo.bravo_fails(&sources, &clients, &before).await?;
    let mut foxtrot = demo.dns_change(&sources, &clients).await?;
    demo.preferred_tier_fails(&mut foxtrot, &clients).await?;
    demo.summary(foxtrot).await
}

/// What the steps share: the DNS server, the backends, srvlb and its two services, and the
/// tally of every client connection so far.
struct Demo {
    dns: TestDns,
    alpha: EchoBackend,
    bravo: EchoBackend,
    charlie: EchoBackend,
    delta: EchoBackend,
    server: Server,
    maglev: Arc<Service>,
    p2c: Arc<Service>,
    maglev_addr: SocketAddr,
    p2c_addr: SocketAddr,
    admin_addr: SocketAddr,
    total: Tally,
}

impl Demo {
    /// Step 1: the DNS server, four echo backends published as SRV records, and srvlb once both
    /// services have found them.
    async fn set_up() -> DemoResult<Demo> {
        section("1. Set-up: DNS server, four echo backends, srvlb");
        let dns = TestDns::start().await?;
        let alpha = EchoBackend::start("alpha").await?;
        let bravo = EchoBackend::start("bravo").await?;
        let charlie = EchoBackend::start("charlie").await?;
        let delta = EchoBackend::start("delta").await?;
        let initial = [
            (&alpha, 10, 10),
            (&bravo, 10, 10),
            (&charlie, 10, 20),
            (&delta, 20, 10),
        ];
        publish(&dns, &initial);
        println!(
            "DNS server (in process, authoritative for {ZONE}) on {}, TTL {TTL}s",
            dns.addr()
        );
        println!("SRV {SRV_NAME}");
        print_records(&initial);
        println!("  (priority 10 is the preferred tier; delta in priority 20 is the backup)");

        let maglev_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let p2c_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let admin_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let toml = demo_config(dns.addr(), maglev_addr, p2c_addr, admin_addr);
        print_config(&toml);
        let config = Config::parse(&toml, "demo.toml")?;
        let server = Server::start(config).await?;
        let maglev = service(&server, MAGLEV)?;
        let p2c = service(&server, P2C)?;
        let discovered = Instant::now();
        wait_for_backends(&[&maglev, &p2c], 4).await?;
        println!();
        println!(
            "srvlb is up: {MAGLEV} on {maglev_addr}, {P2C} on {p2c_addr}, admin on http://{admin_addr}/"
        );
        println!(
            "both services found the 4 backends {:.2}s after start",
            discovered.elapsed().as_secs_f64()
        );
        Ok(Demo {
            dns,
            alpha,
            bravo,
            charlie,
            delta,
            server,
            maglev,
            p2c,
            maglev_addr,
            p2c_addr,
            admin_addr,
            total: Tally::default(),
        })
    }

    /// Step 2: anonymous clients through the p2c service.
    async fn p2c_spread(&mut self, sources: &[Option<Ipv4Addr>]) {
        section("2. p2c: 400 connections through web-p2c, 20 at a time");
        println!(
            "Each client reads the backend's greeting (its name), sends a line, checks the echo."
        );
        let tally = batch(self.p2c_addr, sources, 20).await;
        print_spread(
            &tally,
            &[(&self.alpha, 10), (&self.bravo, 10), (&self.charlie, 20)],
        );
        println!("p2c takes two random backends (by weight) and uses the one with fewer active");
        println!("connections per unit of weight, so charlie (weight 20) gets about half.");
        self.total.add(&tally);
    }

    /// Step 3: one connection per client address through the maglev service, then a few
    /// addresses again to show they stay. Returns where each address landed.
    async fn maglev_spread(&mut self, clients: &[Option<Ipv4Addr>]) -> HashMap<Ipv4Addr, String> {
        section("3. maglev: one connection from each of 200 client addresses through web-maglev");
        let tally = batch(self.maglev_addr, clients, 20).await;
        print_spread(
            &tally,
            &[(&self.alpha, 10), (&self.bravo, 10), (&self.charlie, 20)],
        );
        let before = tally.by_source.clone();
        self.total.add(&tally);

        println!();
        println!("The same client address always lands on the same backend (5 connections each):");
        let sticky: Vec<Option<Ipv4Addr>> = (0..5u8)
            .flat_map(|i| std::iter::repeat_n(Some(client_ip(i)), 5))
            .collect();
        let tally = batch(self.maglev_addr, &sticky, 1).await;
        for i in 0..5u8 {
            let ip = client_ip(i);
            let seen: Vec<&str> = tally
                .sequence
                .iter()
                .filter(|(source, _)| *source == Some(ip))
                .map(|(_, name)| name.as_str())
                .collect();
            let same = seen.windows(2).all(|w| w[0] == w[1]);
            println!(
                "  {:<12} -> {}   {}",
                ip.to_string(),
                seen.join(" "),
                if same { "(same every time)" } else { "(MOVED)" }
            );
        }
        self.total.add(&tally);
        before
    }

    /// Step 4: bravo stops listening: the same traffic again, and which maglev clients moved.
    async fn bravo_fails(
        &mut self,
        sources: &[Option<Ipv4Addr>],
        clients: &[Option<Ipv4Addr>],
        before: &HashMap<Ipv4Addr, String>,
    ) -> DemoResult<()> {
        section("4. Failure: bravo stops listening (its port now refuses connections)");
        self.bravo.kill().await;
        println!(
            "Same traffic as above: 400 connections to web-p2c, 200 client addresses to web-maglev."
        );
        println!("srvlb log lines (warnings) while it happens:");
        let p2c_tally = batch(self.p2c_addr, sources, 20).await;
        let maglev_tally = batch(self.maglev_addr, clients, 20).await;
        println!();
        let survivors = [(&self.alpha, 10), (&self.charlie, 20)];
        println!(
            "web-p2c (bravo: {} connections):",
            p2c_tally.count(&self.bravo.name)
        );
        print_spread(&p2c_tally, &survivors);
        println!(
            "web-maglev (bravo: {} connections):",
            maglev_tally.count(&self.bravo.name)
        );
        print_spread(&maglev_tally, &survivors);
        println!("maglev keeps the weights. p2c balances *active* connections per unit of weight;");
        println!(
            "with only a few short connections in flight, its split is only roughly by weight."
        );
        let failed_now = p2c_tally.failures + maglev_tally.failures;
        println!(
            "client failures: {failed_now} of {} (a refused connect is retried on another backend)",
            p2c_tally.total() + maglev_tally.total()
        );
        let (on_bravo, moved_from_bravo, moved_others) =
            compare_mapping(before, &maglev_tally.by_source, &self.bravo.name);
        println!(
            "maglev: {moved_from_bravo} of the {on_bravo} clients that were on bravo moved; \
             {moved_others} of the other {} clients moved",
            before.len().saturating_sub(on_bravo)
        );
        self.total.add(&p2c_tally);
        self.total.add(&maglev_tally);
        self.print_status().await
    }

    /// Step 5: new records while clients keep connecting: bravo gone, foxtrot added, two
    /// backends reweighted; the pools follow, then the traffic splits by the new weights.
    /// Returns foxtrot, which runs from here on.
    async fn dns_change(
        &mut self,
        sources: &[Option<Ipv4Addr>],
        clients: &[Option<Ipv4Addr>],
    ) -> DemoResult<EchoBackend> {
        section("5. DNS change: drop bravo, add foxtrot, reweight alpha 10->30 and charlie 20->10");
        let foxtrot = EchoBackend::start("foxtrot").await?;
        let load = Load::start(self.p2c_addr, self.maglev_addr);
        // Let the background clients run against the old records for a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let changed = [
            (&self.alpha, 10, 30),
            (&self.charlie, 10, 10),
            (&foxtrot, 10, 10),
            (&self.delta, 20, 10),
        ];
        let published = Instant::now();
        publish(&self.dns, &changed);
        println!("New SRV records (clients keep connecting in the background meanwhile):");
        print_records(&changed);
        let expected = expected_pool(&changed);
        wait_for(Duration::from_secs(10), || {
            [&self.maglev, &self.p2c]
                .iter()
                .all(|s| pool_view(s) == expected)
        })
        .await
        .map_err(|()| "srvlb's pools did not follow the DNS change within 10s")?;
        println!(
            "both pools match the new records {:.2}s after the change (record TTL {TTL}s)",
            published.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let background = load.stop().await;
        println!(
            "background clients during the change: {} connections, {} failed",
            background.total(),
            background.failures
        );
        self.total.add(&background);
        self.print_status().await?;

        println!();
        println!("Traffic after the change:");
        let weights = [(&self.alpha, 30), (&self.charlie, 10), (&foxtrot, 10)];
        let tally = batch(self.p2c_addr, sources, 20).await;
        println!("web-p2c, 400 connections:");
        print_spread(&tally, &weights);
        self.total.add(&tally);
        let tally = batch(self.maglev_addr, clients, 20).await;
        println!("web-maglev, 200 client addresses:");
        print_spread(&tally, &weights);
        self.total.add(&tally);
        Ok(foxtrot)
    }

    /// Step 6: every backend of the preferred tier stops listening: the backup tier serves.
    async fn preferred_tier_fails(
        &mut self,
        foxtrot: &mut EchoBackend,
        clients: &[Option<Ipv4Addr>],
    ) -> DemoResult<()> {
        section("6. The whole preferred tier fails: alpha, charlie and foxtrot stop listening");
        self.alpha.kill().await;
        self.charlie.kill().await;
        foxtrot.kill().await;
        println!("200 connections to web-p2c, 200 client addresses to web-maglev. After 3 refused");
        println!(
            "connects a backend is ejected, or, past max_ejected_percent (default 50), held in"
        );
        println!(
            "service but passed over; a refused connect is retried elsewhere, and a tier whose"
        );
        println!("backends are all failing yields to the next tier (delta, priority 20).");
        let some = vec![None; 200];
        let p2c_tally = batch(self.p2c_addr, &some, 20).await;
        let maglev_tally = batch(self.maglev_addr, clients, 20).await;
        let backup = [(&self.delta, 10)];
        println!("web-p2c:");
        print_spread(&p2c_tally, &backup);
        println!("web-maglev:");
        print_spread(&maglev_tally, &backup);
        self.total.add(&p2c_tally);
        self.total.add(&maglev_tally);
        self.print_status().await?;
        println!();
        println!("GET http://{}/metrics (excerpt):", self.admin_addr);
        print_metrics(
            self.admin_addr,
            &[
                "srvlb_service_connections_total",
                "srvlb_service_retries_total",
                "srvlb_service_connect_exhausted_total",
            ],
        )
        .await
    }

    /// Step 7: what every backend accepted, then everything shut down; an error when any client
    /// failed.
    async fn summary(mut self, foxtrot: EchoBackend) -> DemoResult<String> {
        section("7. Summary");
        let total = &self.total;
        println!(
            "client connections: {}, failed: {}",
            total.total(),
            total.failures
        );
        if let Some(e) = &total.first_error {
            println!("first failure: {e}");
        }
        for backend in [
            &self.alpha,
            &self.bravo,
            &self.charlie,
            &self.delta,
            &foxtrot,
        ] {
            println!(
                "  {:<8} accepted {:>5} connections{}",
                backend.name,
                backend.accepted(),
                match backend.name.as_str() {
                    "bravo" => " (killed in step 4)",
                    "delta" => " (backup tier)",
                    _ if backend.accept_task.is_none() => " (killed in step 6)",
                    _ => "",
                }
            );
        }
        println!("Shutting down srvlb (drain), the backends and the DNS server.");
        self.server.shutdown(Duration::from_secs(2)).await;
        self.delta.kill().await;
        self.dns.shutdown().await;
        if self.total.failures > 0 {
            return Err(format!("{} client connections failed", self.total.failures).into());
        }
        Ok(format!(
            "{} client connections, none failed.",
            self.total.total()
        ))
    }

    /// The admin endpoint's /status, excerpted.
    async fn print_status(&self) -> DemoResult<()> {
        println!();
        println!("GET http://{}/status (excerpt):", self.admin_addr);
        print_status(&fetch_status(self.admin_addr).await?)
    }
}

/// Waits (10 s at most) until every service's pool has `count` backends.
async fn wait_for_backends(services: &[&Arc<Service>], count: usize) -> DemoResult<()> {
    wait_for(Duration::from_secs(10), || {
        services
            .iter()
            .all(|s| s.pool.snapshot().backend_count() == count)
    })
    .await
    .map_err(|()| format!("srvlb did not discover the {count} backends within 10s").into())
}

// ------------------------------------------------------------------------- configuration

fn demo_config(dns: SocketAddr, maglev: SocketAddr, p2c: SocketAddr, admin: SocketAddr) -> String {
    format!(
        r#"
[global]
admin = "{admin}"
shutdown_grace = "2s"

[resolver]
nameservers = ["{dns}"]
timeout = "1s"
min_refresh = "1s"
max_refresh = "10s"

[[service]]
name = "{MAGLEV}"
listen = ["{maglev}"]
srv = "{SRV_NAME}"
balance = "maglev"
connect_timeout = "500ms"
[service.health]
consecutive_failures = 3
base_ejection = "30s"

[[service]]
name = "{P2C}"
listen = ["{p2c}"]
srv = "{SRV_NAME}"
balance = "p2c"
connect_timeout = "500ms"
[service.health]
consecutive_failures = 3
base_ejection = "30s"
"#
    )
}

/// A port that was free a moment ago (the config rejects port 0 for listeners).
fn free_port() -> DemoResult<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

fn client_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, i.saturating_add(2))
}

fn check_loopback_range() -> DemoResult<()> {
    match std::net::TcpListener::bind((client_ip(0), 0)) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "cannot bind a client socket to {}: {e}. The demo needs the whole 127.0.0.0/8 \
             on loopback (Linux) to show maglev's per-client stickiness.",
            client_ip(0)
        )
        .into()),
    }
}

fn service(server: &Server, name: &str) -> DemoResult<Arc<Service>> {
    server
        .services()
        .find(|s| s.name == name)
        .cloned()
        .ok_or_else(|| format!("srvlb has no service {name:?}").into())
}

async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

// ------------------------------------------------------------------------- DNS

fn host(backend: &EchoBackend) -> String {
    format!("{}.{ZONE}", backend.name)
}

/// Publishes the SRV RRset (and each target's A record) with `TTL`.
fn publish(dns: &TestDns, records: &[(&EchoBackend, u16, u16)]) {
    let mut srv = Vec::new();
    for (backend, priority, weight) in records {
        dns.set_addrs(&host(backend), TTL, &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        srv.push(Srv {
            priority: *priority,
            weight: *weight,
            port: backend.addr.port(),
            target: host(backend),
        });
    }
    dns.set_srv(SRV_NAME, TTL, &srv);
}

fn print_records(records: &[(&EchoBackend, u16, u16)]) {
    println!(
        "  {:<20} {:<17} {:>8} {:>6}",
        "target", "address", "priority", "weight"
    );
    for (backend, priority, weight) in records {
        println!(
            "  {:<20} {:<17} {:>8} {:>6}",
            host(backend),
            backend.addr.to_string(),
            priority,
            weight
        );
    }
}

/// (target, priority, weight) of every backend in a pool, sorted; draining ones left out.
fn pool_view(service: &Service) -> Vec<(String, u16, u16)> {
    let mut view: Vec<(String, u16, u16)> = service
        .pool
        .states()
        .into_iter()
        .filter(|st| st.state.label() != "draining")
        .map(|st| (st.backend.key.target.to_string(), st.priority, st.weight))
        .collect();
    view.sort();
    view
}

fn expected_pool(records: &[(&EchoBackend, u16, u16)]) -> Vec<(String, u16, u16)> {
    let mut view: Vec<(String, u16, u16)> = records
        .iter()
        .map(|(b, priority, weight)| (host(b), *priority, *weight))
        .collect();
    view.sort();
    view
}
