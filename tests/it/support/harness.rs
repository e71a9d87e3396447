//! Test harness: a spawned `srvlb` process with its config in a temp dir, backends that say
//! who they are, and small client helpers. Everything listens on 127.0.0.1 only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1, below the ephemeral range so that no
/// client socket of the test takes it before srvlb binds it (see `bind::free_port`).
pub fn free_port() -> u16 {
    super::bind::free_port().expect("a free port")
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "srvlb-test-{tag}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A running srvlb binary. Killed on drop.
pub struct Srvlb {
    child: Child,
    pub config_path: PathBuf,
    dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Srvlb {
    /// Starts srvlb with `config` and waits (up to 10 s) for "srvlb ready".
    pub fn start(config: &str) -> Srvlb {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Srvlb {
        let srvlb = Self::spawn_with_env(config, env);
        srvlb.wait_log("srvlb ready", Duration::from_secs(10));
        srvlb
    }

    /// Starts srvlb with RLIMIT_NOFILE (soft and hard) set to `nofile` for it alone.
    pub fn start_with_nofile(config: &str, nofile: u64) -> Srvlb {
        let srvlb = Self::spawn(config, &[], Some(nofile));
        srvlb.wait_log("srvlb ready", Duration::from_secs(10));
        srvlb
    }

    /// Spawns srvlb without waiting for it to be ready (for tests that watch startup itself,
    /// e.g. through NOTIFY_SOCKET).
    pub fn spawn_with_env(config: &str, env: &[(&str, &str)]) -> Srvlb {
        Self::spawn(config, env, None)
    }

    /// The binary under test: the one cargo built, or `SRVLB_TEST_BIN` (to measure another
    /// build, e.g. the previous release, with the same tests).
    fn binary() -> PathBuf {
        std::env::var_os("SRVLB_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_srvlb")))
    }

    /// Spawns srvlb; with `nofile`, through `sh -c 'ulimit -n N; exec srvlb ...'` so that
    /// the limit applies to srvlb alone (the same pid: `exec` replaces the shell).
    fn spawn(config: &str, env: &[(&str, &str)], nofile: Option<u64>) -> Srvlb {
        let dir = temp_dir("srvlb");
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = match nofile {
            None => Command::new(Self::binary()),
            Some(n) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(Self::binary());
                sh
            }
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("SRVLB_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn srvlb");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("SRVLB_TEST_ECHO_LOG").is_some() {
                    eprintln!("srvlb| {line}");
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        Srvlb {
            child,
            config_path,
            dir,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log().iter().any(|l| l.contains(needle))
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for a log line containing `needle`; panics with the log after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        self.wait_log_count(needle, 1, timeout);
    }

    pub fn wait_log_count(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count_log(needle) >= count {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "srvlb did not log {count}x {needle:?} within {timeout:?}; log:\n{}",
            self.log().join("\n")
        );
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    pub fn write_config(&self, config: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, config).expect("write config");
        std::fs::rename(&tmp, &self.config_path).expect("rename config");
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Open file descriptors of the srvlb process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory of the srvlb process in KiB (VmRSS), 0 if unreadable.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// CPU time (user + system) the srvlb process has used so far, from /proc/PID/stat.
    pub fn cpu_time(&self) -> Duration {
        let ticks = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                // Fields after the parenthesised command name; utime and stime are the
                // 14th and 15th fields of the line, the 12th and 13th after ")".
                let rest = s.rsplit_once(')')?.1;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let utime: u64 = fields.get(11)?.parse().ok()?;
                let stime: u64 = fields.get(12)?.parse().ok()?;
                Some(utime + stime)
            })
            .unwrap_or(0);
        // USER_HZ is 100 on every Linux architecture srvlb runs on.
        Duration::from_millis(ticks * 10)
    }
}

impl Drop for Srvlb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How a test backend behaves once a client is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Sends "<name>\n", then echoes everything until EOF, then closes.
    Identify,
    /// Echoes everything until EOF, then closes (no greeting: byte-exact tests).
    Echo,
    /// Reads until the client's FIN, then sends everything back and closes: works only if
    /// the proxy passes a half-close on and keeps the other direction open.
    ReplyAfterEof,
}

/// A TCP backend on 127.0.0.1 in a thread per connection. Stops (and its port refuses)
/// when dropped or `stop`ped.
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestBackend {
    pub fn start(name: &str, mode: Mode) -> TestBackend {
        // Below the ephemeral range, so a test that restarts the backend on its old port
        // (`start_on`) never finds it taken by one of its own client sockets.
        let listener = (0..20)
            .find_map(|_| TcpListener::bind(("127.0.0.1", free_port())).ok())
            .expect("bind backend");
        Self::serve(name, listener, mode)
    }

    /// Starts on a given address (to restart a backend on its old port).
    pub fn start_on(name: &str, addr: SocketAddr, mode: Mode) -> TestBackend {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind(addr) {
                Ok(listener) => return Self::serve(name, listener, mode),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot rebind backend {addr}: {e}"),
            }
        }
    }

    fn serve(name: &str, listener: TcpListener, mode: Mode) -> TestBackend {
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop2, accepted2, name2) = (Arc::clone(&stop), Arc::clone(&accepted), name.to_owned());
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        accepted2.fetch_add(1, Ordering::Relaxed);
                        let name = name2.clone();
                        let stop = Arc::clone(&stop2);
                        thread::spawn(move || serve_one(stream, &name, mode, &stop));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        TestBackend {
            name: name.to_owned(),
            addr,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes the listener: new connects are refused. Open connections are reset.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_one(mut stream: TcpStream, name: &str, mode: Mode, stop: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    if mode == Mode::Identify && stream.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    if mode == Mode::ReplyAfterEof {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut all = Vec::new();
        if stream.read_to_end(&mut all).is_ok() {
            let _ = stream.write_all(&all);
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if stop.load(Ordering::Relaxed) {
                    // A stopped backend is gone: reset what is still open.
                    let _ = socket_reset(&stream);
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn socket_reset(stream: &TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// An echo backend on a tokio runtime of its own: it holds thousands of connections with one
/// thread, where `TestBackend` spends a thread on each. For soaks. Stops when dropped.
pub struct ManyEcho {
    runtime: Option<tokio::runtime::Runtime>,
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
}

impl ManyEcho {
    pub fn start() -> ManyEcho {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime.block_on(async {
            for _ in 0..20 {
                if let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", free_port())).await {
                    return l;
                }
            }
            panic!("cannot bind an echo backend");
        });
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&open);
        runtime.spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    count.fetch_add(1, Ordering::Relaxed);
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    count.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        ManyEcho {
            runtime: Some(runtime),
            addr,
            open,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections open to this backend now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for ManyEcho {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Connects through srvlb and returns the name of the backend that answered.
pub fn who_answers(addr: SocketAddr) -> std::io::Result<String> {
    who_answers_from(addr, None)
}

/// Like `who_answers`, binding the client socket to `source` (e.g. 127.0.0.7:0).
pub fn who_answers_from(addr: SocketAddr, source: Option<SocketAddr>) -> std::io::Result<String> {
    let stream = match source {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5))?,
        Some(src) => {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&src.into())?;
            socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
            socket.into()
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a greeting",
        ));
    }
    Ok(line.trim_end().to_owned())
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// GETs `path` from the admin endpoint at `addr` and returns the response body. Panics on
/// any failure (a test helper); bounded by 10 s timeouts.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed HTTP response: {response:?}"));
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "GET {path} failed: {head}"
    );
    body.to_owned()
}

/// GETs `path` from the admin endpoint, timing it from connect to the end of the response:
/// `(elapsed, status line, body)`. Errors instead of panicking (for tests that measure).
pub fn timed_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(Duration, String, String)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_owned();
    Ok((elapsed, status, body.to_owned()))
}

/// The value of the first /metrics line that starts with `prefix` (name and labels).
pub fn metric_value(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The SRV name the in-process DNS fixture publishes by default.
pub const SRV_NAME: &str = "_app._tcp.srvlb.test.";

/// The host name a test backend is published under: `<name>.srvlb.test.`
pub fn srv_host(name: &str) -> String {
    format!("{name}.srvlb.test.")
}

/// The in-process DNS server on a runtime of its own, for tests written with blocking
/// sockets. Stops when dropped.
pub struct Dns {
    runtime: tokio::runtime::Runtime,
    pub server: super::dns::TestDns,
}

impl Dns {
    pub fn start() -> Dns {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime
            .block_on(super::dns::TestDns::start())
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
            records.push(super::dns::Srv {
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

/// A listener whose accept queue is full and that never accepts: the kernel drops further
/// SYNs, so connects to it time out.
pub struct BlackHole {
    _listener: socket2::Socket,
    _queued: Vec<socket2::Socket>,
    pub addr: SocketAddr,
}

pub fn black_hole() -> BlackHole {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind black hole");
    listener.listen(0).expect("listen");
    let addr = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("black hole address");
    let mut queued = Vec::new();
    for _ in 0..8 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        if s.connect_timeout(&addr.into(), Duration::from_millis(300))
            .is_err()
        {
            break;
        }
        queued.push(s);
    }
    let probe = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    assert!(
        probe
            .connect_timeout(&addr.into(), Duration::from_millis(300))
            .is_err(),
        "setup: the black hole still completes handshakes"
    );
    BlackHole {
        _listener: listener,
        _queued: queued,
        addr,
    }
}
