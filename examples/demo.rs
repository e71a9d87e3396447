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

#[path = "../tests/it/support/dns.rs"]
mod dns;

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dns::{Srv, TestDns};
use srvlb::config::Config;
use srvlb::control::Server;
use srvlb::service::Service;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing_subscriber::EnvFilter;

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

    // ---------------------------------------------------------------- 1. set-up
    section("1. Set-up: DNS server, four echo backends, srvlb");
    let dns = TestDns::start().await?;
    let mut alpha = EchoBackend::start("alpha").await?;
    let mut bravo = EchoBackend::start("bravo").await?;
    let mut charlie = EchoBackend::start("charlie").await?;
    let mut delta = EchoBackend::start("delta").await?;
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
    println!();
    println!("srvlb configuration (parsed with srvlb::config::Config::parse):");
    for line in toml.trim().lines() {
        println!("  | {line}");
    }
    let config = Config::parse(&toml, "demo.toml")?;
    let server = Server::start(config).await?;
    let maglev = service(&server, MAGLEV)?;
    let p2c = service(&server, P2C)?;
    let discovered = Instant::now();
    wait_for(Duration::from_secs(10), || {
        [&maglev, &p2c]
            .iter()
            .all(|s| s.pool.snapshot().backend_count() == 4)
    })
    .await
    .map_err(|()| "srvlb did not discover the 4 backends within 10s")?;
    println!();
    println!(
        "srvlb is up: {MAGLEV} on {maglev_addr}, {P2C} on {p2c_addr}, admin on http://{admin_addr}/"
    );
    println!(
        "both services found the 4 backends {:.2}s after start",
        discovered.elapsed().as_secs_f64()
    );

    let mut total = Tally::default();

    // ---------------------------------------------------------------- 2. p2c
    section("2. p2c: 400 connections through web-p2c, 20 at a time");
    println!("Each client reads the backend's greeting (its name), sends a line, checks the echo.");
    let sources = vec![None; 400];
    let tally = batch(p2c_addr, &sources, 20).await;
    print_spread(&tally, &[(&alpha, 10), (&bravo, 10), (&charlie, 20)]);
    println!("p2c takes two random backends (by weight) and uses the one with fewer active");
    println!("connections per unit of weight, so charlie (weight 20) gets about half.");
    total.add(&tally);

    // ---------------------------------------------------------------- 3. maglev
    section("3. maglev: one connection from each of 200 client addresses through web-maglev");
    let clients: Vec<Option<Ipv4Addr>> = (0..CLIENTS).map(|i| Some(client_ip(i))).collect();
    let tally = batch(maglev_addr, &clients, 20).await;
    print_spread(&tally, &[(&alpha, 10), (&bravo, 10), (&charlie, 20)]);
    let before = tally.by_source.clone();
    total.add(&tally);

    println!();
    println!("The same client address always lands on the same backend (5 connections each):");
    let sticky: Vec<Option<Ipv4Addr>> = (0..5u8)
        .flat_map(|i| std::iter::repeat_n(Some(client_ip(i)), 5))
        .collect();
    let tally = batch(maglev_addr, &sticky, 1).await;
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
    total.add(&tally);

    // ---------------------------------------------------------------- 4. failure
    section("4. Failure: bravo stops listening (its port now refuses connections)");
    bravo.kill().await;
    println!(
        "Same traffic as above: 400 connections to web-p2c, 200 client addresses to web-maglev."
    );
    println!("srvlb log lines (warnings) while it happens:");
    let p2c_tally = batch(p2c_addr, &sources, 20).await;
    let maglev_tally = batch(maglev_addr, &clients, 20).await;
    println!();
    let survivors = [(&alpha, 10), (&charlie, 20)];
    println!(
        "web-p2c (bravo: {} connections):",
        p2c_tally.count(&bravo.name)
    );
    print_spread(&p2c_tally, &survivors);
    println!(
        "web-maglev (bravo: {} connections):",
        maglev_tally.count(&bravo.name)
    );
    print_spread(&maglev_tally, &survivors);
    println!("maglev keeps the weights. p2c balances *active* connections per unit of weight;");
    println!("with only a few short connections in flight, its split is only roughly by weight.");
    let failed_now = p2c_tally.failures + maglev_tally.failures;
    println!(
        "client failures: {failed_now} of {} (a refused connect is retried on another backend)",
        p2c_tally.total() + maglev_tally.total()
    );
    let (on_bravo, moved_from_bravo, moved_others) =
        compare_mapping(&before, &maglev_tally.by_source, &bravo.name);
    println!(
        "maglev: {moved_from_bravo} of the {on_bravo} clients that were on bravo moved; \
         {moved_others} of the other {} clients moved",
        before.len().saturating_sub(on_bravo)
    );
    total.add(&p2c_tally);
    total.add(&maglev_tally);

    println!();
    println!("GET http://{admin_addr}/status (excerpt):");
    print_status(&fetch_status(admin_addr).await?)?;

    // ---------------------------------------------------------------- 5. DNS change
    section("5. DNS change: drop bravo, add foxtrot, reweight alpha 10->30 and charlie 20->10");
    let mut foxtrot = EchoBackend::start("foxtrot").await?;
    let load = Load::start(p2c_addr, maglev_addr);
    // Let the background clients run against the old records for a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let changed = [
        (&alpha, 10, 30),
        (&charlie, 10, 10),
        (&foxtrot, 10, 10),
        (&delta, 20, 10),
    ];
    let published = Instant::now();
    publish(&dns, &changed);
    println!("New SRV records (clients keep connecting in the background meanwhile):");
    print_records(&changed);
    let expected = expected_pool(&changed);
    wait_for(Duration::from_secs(10), || {
        [&maglev, &p2c].iter().all(|s| pool_view(s) == expected)
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
    total.add(&background);

    println!();
    println!("GET http://{admin_addr}/status (excerpt):");
    print_status(&fetch_status(admin_addr).await?)?;

    println!();
    println!("Traffic after the change:");
    let weights = [(&alpha, 30), (&charlie, 10), (&foxtrot, 10)];
    let tally = batch(p2c_addr, &sources, 20).await;
    println!("web-p2c, 400 connections:");
    print_spread(&tally, &weights);
    total.add(&tally);
    let tally = batch(maglev_addr, &clients, 20).await;
    println!("web-maglev, 200 client addresses:");
    print_spread(&tally, &weights);
    total.add(&tally);

    // ---------------------------------------------------------------- 6. backup tier
    section("6. The whole preferred tier fails: alpha, charlie and foxtrot stop listening");
    alpha.kill().await;
    charlie.kill().await;
    foxtrot.kill().await;
    println!("200 connections to web-p2c, 200 client addresses to web-maglev. After 3 refused");
    println!("connects a backend is ejected, or, past max_ejected_percent (default 50), held in");
    println!("service but passed over; a refused connect is retried elsewhere, and a tier whose");
    println!("backends are all failing yields to the next tier (delta, priority 20).");
    let some = vec![None; 200];
    let p2c_tally = batch(p2c_addr, &some, 20).await;
    let maglev_tally = batch(maglev_addr, &clients, 20).await;
    let backup = [(&delta, 10)];
    println!("web-p2c:");
    print_spread(&p2c_tally, &backup);
    println!("web-maglev:");
    print_spread(&maglev_tally, &backup);
    total.add(&p2c_tally);
    total.add(&maglev_tally);
    println!();
    println!("GET http://{admin_addr}/status (excerpt):");
    print_status(&fetch_status(admin_addr).await?)?;
    println!();
    println!("GET http://{admin_addr}/metrics (excerpt):");
    print_metrics(
        admin_addr,
        &[
            "srvlb_service_connections_total",
            "srvlb_service_retries_total",
            "srvlb_service_connect_exhausted_total",
        ],
    )
    .await?;

    // ---------------------------------------------------------------- 7. wrap up
    section("7. Summary");
    println!(
        "client connections: {}, failed: {}",
        total.total(),
        total.failures
    );
    if let Some(e) = &total.first_error {
        println!("first failure: {e}");
    }
    for backend in [&alpha, &bravo, &charlie, &delta, &foxtrot] {
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
    server.shutdown(Duration::from_secs(2)).await;
    delta.kill().await;
    dns.shutdown().await;
    if total.failures > 0 {
        return Err(format!("{} client connections failed", total.failures).into());
    }
    Ok(format!(
        "{} client connections, none failed.",
        total.total()
    ))
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

// ------------------------------------------------------------------------- backends

/// A backend that greets each connection with its name and a newline, then echoes.
struct EchoBackend {
    name: String,
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    accept_task: Option<JoinHandle<()>>,
}

impl EchoBackend {
    async fn start(name: &str) -> DemoResult<EchoBackend> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let greeting = format!("{name}\n");
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    // A client that vanishes mid-echo is not the backend's problem.
                    let _ = greet_and_echo(stream, greeting.as_bytes()).await;
                });
            }
        });
        Ok(EchoBackend {
            name: name.to_owned(),
            addr,
            accepted,
            accept_task: Some(accept_task),
        })
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes the listening socket: new connections are refused from now on.
    async fn kill(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
            // The listener is dropped (the port closed) once the aborted task is gone.
            let _ = task.await;
        }
    }
}

async fn greet_and_echo(mut stream: TcpStream, greeting: &[u8]) -> std::io::Result<()> {
    stream.write_all(greeting).await?;
    let (mut read, mut write) = stream.split();
    tokio::io::copy(&mut read, &mut write).await?;
    write.shutdown().await
}

// ------------------------------------------------------------------------- clients

/// One client exchange through srvlb: connect (from `source` if given), read the backend's
/// greeting, send a line and check it comes back. Returns the backend's name.
async fn visit(service: SocketAddr, source: Option<Ipv4Addr>) -> DemoResult<String> {
    tokio::time::timeout(VISIT_TIMEOUT, async {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::from((ip, 0)))?;
        }
        let stream = socket.connect(service).await?;
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).await?;
        let name = greeting.trim_end().to_owned();
        if name.is_empty() {
            return Err::<String, DemoError>("connection closed before the greeting".into());
        }
        let message = b"hello through srvlb\n";
        reader.get_mut().write_all(message).await?;
        let mut echo = vec![0u8; message.len()];
        reader.read_exact(&mut echo).await?;
        if echo != message {
            return Err(format!("{name} echoed {:?}", String::from_utf8_lossy(&echo)).into());
        }
        Ok(name)
    })
    .await
    .map_err(|_| DemoError::from("timed out"))?
}

/// Results of a set of client exchanges.
#[derive(Default, Clone)]
struct Tally {
    by_backend: BTreeMap<String, u64>,
    /// Backend each client address landed on (the last one, if it connected several times).
    by_source: HashMap<Ipv4Addr, String>,
    /// (source, backend) in completion order.
    sequence: Vec<(Option<Ipv4Addr>, String)>,
    failures: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, source: Option<Ipv4Addr>, result: Result<String, String>) {
        match result {
            Ok(name) => {
                *self.by_backend.entry(name.clone()).or_default() += 1;
                if let Some(ip) = source {
                    self.by_source.insert(ip, name.clone());
                }
                self.sequence.push((source, name));
            }
            Err(e) => {
                self.failures += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn count(&self, name: &str) -> u64 {
        self.by_backend.get(name).copied().unwrap_or(0)
    }

    fn ok(&self) -> u64 {
        self.by_backend.values().sum()
    }

    fn total(&self) -> u64 {
        self.ok() + self.failures
    }

    /// Adds another tally's counts (not its per-client detail).
    fn add(&mut self, other: &Tally) {
        for (name, n) in &other.by_backend {
            *self.by_backend.entry(name.clone()).or_default() += n;
        }
        self.failures += other.failures;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// Runs one client exchange per entry of `sources`, at most `concurrency` at a time.
async fn batch(service: SocketAddr, sources: &[Option<Ipv4Addr>], concurrency: usize) -> Tally {
    let mut tally = Tally::default();
    let mut running = JoinSet::new();
    for &source in sources {
        if running.len() >= concurrency.max(1) {
            join_one(&mut running, &mut tally).await;
        }
        running.spawn(async move {
            let result = visit(service, source).await.map_err(|e| e.to_string());
            (source, result)
        });
    }
    while !running.is_empty() {
        join_one(&mut running, &mut tally).await;
    }
    tally
}

type VisitOutcome = (Option<Ipv4Addr>, Result<String, String>);

async fn join_one(running: &mut JoinSet<VisitOutcome>, tally: &mut Tally) {
    match running.join_next().await {
        Some(Ok((source, result))) => tally.record(source, result),
        Some(Err(e)) => tally.record(None, Err(format!("client task failed: {e}"))),
        None => {}
    }
}

/// Clients that keep connecting to both services until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    workers: JoinSet<Tally>,
}

impl Load {
    fn start(p2c: SocketAddr, maglev: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = JoinSet::new();
        for worker in 0..4u8 {
            let stop = Arc::clone(&stop);
            workers.spawn(async move {
                let mut tally = Tally::default();
                let mut i = worker;
                while !stop.load(Ordering::Relaxed) {
                    let (service, source) = if worker % 2 == 0 {
                        (p2c, None)
                    } else {
                        (maglev, Some(client_ip(i % CLIENTS)))
                    };
                    let result = visit(service, source).await.map_err(|e| e.to_string());
                    tally.record(source, result);
                    i = i.wrapping_add(4);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tally
            });
        }
        Load { stop, workers }
    }

    async fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        while let Some(joined) = self.workers.join_next().await {
            match joined {
                Ok(tally) => total.add(&tally),
                Err(e) => total.record(None, Err(format!("load worker failed: {e}"))),
            }
        }
        total
    }
}

/// (clients that were on `name`, of those how many moved, how many others moved).
fn compare_mapping(
    before: &HashMap<Ipv4Addr, String>,
    after: &HashMap<Ipv4Addr, String>,
    name: &str,
) -> (usize, usize, usize) {
    let (mut on, mut moved_from, mut moved_others) = (0, 0, 0);
    for (ip, old) in before {
        let moved = after.get(ip).is_some_and(|new| new != old);
        if old == name {
            on += 1;
            moved_from += usize::from(moved);
        } else {
            moved_others += usize::from(moved);
        }
    }
    (on, moved_from, moved_others)
}

// ------------------------------------------------------------------------- output

fn heading(text: &str) {
    println!("{text}");
    println!("{}", "=".repeat(text.len()));
}

fn section(text: &str) {
    println!();
    println!("{text}");
    println!("{}", "-".repeat(text.len()));
}

/// Connections per backend with the share a weight-proportional spread would give.
fn print_spread(tally: &Tally, weights: &[(&EchoBackend, u16)]) {
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
async fn http_get(admin: SocketAddr, path: &str) -> DemoResult<String> {
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

async fn fetch_status(admin: SocketAddr) -> DemoResult<serde_json::Value> {
    Ok(serde_json::from_str(&http_get(admin, "/status").await?)?)
}

/// Prints the /metrics samples whose line starts with one of `names`.
async fn print_metrics(admin: SocketAddr, names: &[&str]) -> DemoResult<()> {
    let body = http_get(admin, "/metrics").await?;
    for line in body.lines() {
        if !line.starts_with('#') && names.iter().any(|n| line.starts_with(n)) {
            println!("  {line}");
        }
    }
    Ok(())
}

/// One table per service: backend, priority, weight, state, connections, failures, reason.
fn print_status(status: &serde_json::Value) -> DemoResult<()> {
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
