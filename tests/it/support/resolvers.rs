//! Two more real DNS servers from Debian for end-to-end tests, beside bind9 (`bind.rs`):
//!
//! * [`Unbound`]: a caching resolver in front of a `named`, the way many hosts reach their
//!   registry (a local cache forwarding one zone to the authority). Its query log
//!   (`log-queries`) tells how many queries srvlb sends.
//! * [`Dnsmasq`]: serving SRV records itself (`srv-host=`, `host-record=`), as small
//!   deployments do. It has no dynamic updates: [`Dnsmasq::restart_with`] restarts it with
//!   new records on the same address.
//!
//! Both run in the foreground as children of the test, on a private loopback address
//! (127.0.0.153 / 127.0.0.154) and a port below the ephemeral range, with everything they
//! write in a temp directory; Drop stops them (SIGTERM, then SIGKILL) and removes it. A
//! missing binary skips the test on a developer machine and fails it under `CI=true`
//! (`.ci/install-deps` installs `unbound` and `dnsmasq-base`).
//!
//! Gotchas: unbound answers NXDOMAIN itself for special-use domains such as `test.` unless
//! told `local-zone: "test." nodefault`; it refuses to query 127.0.0.1 unless `do-not-query-localhost: no`, and
//! validates DNSSEC unless `module-config` leaves the validator out; dnsmasq drops to user
//! `nobody` unless told `--user` and answers from /etc/hosts unless `--no-hosts`; with
//! `--local=/zone/` it answers NXDOMAIN itself for names it does not know.
#![allow(dead_code)]

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::bind::{find_program, free_port, skip_or_fail, terminate};

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Loopback addresses of the two servers, apart from bind's 127.0.0.1.
pub const UNBOUND_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 153);
pub const DNSMASQ_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 154);

/// A child DNS server process with its directory and log file.
struct Server {
    name: &'static str,
    dir: PathBuf,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Server {
    fn new(name: &'static str, ip: Ipv4Addr) -> io::Result<Server> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("srvlb-{name}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(Server {
            name,
            dir,
            addr: SocketAddr::from((ip, 0)),
            child: None,
        })
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Spawns `cmd` with its output appended to the log and waits until the server answers
    /// `probe` over UDP (any response).
    fn spawn(&mut self, mut cmd: Command, probe: &str) -> io::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "{} exited with {status} on {}; log:\n{}",
                    self.name,
                    self.addr,
                    self.log()
                )));
            }
            if answers(self.addr, probe) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} did not answer on {}; log:\n{}",
                        self.name,
                        self.addr,
                        self.log()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// True when `addr` answers a query for `name` (type A) at all.
fn answers(addr: SocketAddr, name: &str) -> bool {
    let Ok(sock) = UdpSocket::bind((addr.ip(), 0)) else {
        return false;
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if sock.send_to(&q, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[0] == 0x12 && buf[1] == 0x34)
}

/// Picks a port free for UDP on `ip` (and below the ephemeral range, see `bind::free_port`).
fn port_on(ip: Ipv4Addr) -> io::Result<u16> {
    for _ in 0..50 {
        let port = free_port()?;
        if UdpSocket::bind((ip, port)).is_ok() && std::net::TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::other(format!("no free port on {ip}")))
}

/// One query as a server logged it: when (Unix seconds), name and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedQuery {
    pub at: u64,
    pub name: String,
    pub qtype: String,
}

/// A caching `unbound` forwarding one zone to an authoritative server (a stub zone).
pub struct Unbound {
    server: Server,
}

impl Unbound {
    /// Starts unbound on [`UNBOUND_IP`] with `zone` stubbed to `authority`; `None` (after
    /// the skip-or-fail rule) when unbound is not installed.
    pub fn start_or_skip(zone: &str, authority: SocketAddr) -> Option<Unbound> {
        let Some(bin) = find_program("unbound") else {
            skip_or_fail("unbound is not installed (run .ci/install-deps)");
            return None;
        };
        match Self::start(bin, zone, authority) {
            Ok(u) => Some(u),
            Err(e) => panic!("starting unbound failed: {e}"),
        }
    }

    fn start(bin: PathBuf, zone: &str, authority: SocketAddr) -> io::Result<Unbound> {
        let mut server = Server::new("unbound", UNBOUND_IP)?;
        let mut last = None;
        for _ in 0..3 {
            let port = port_on(UNBOUND_IP)?;
            server.addr = SocketAddr::from((UNBOUND_IP, port));
            let d = server.dir.display();
            // One thread, IPv4 only, no DNSSEC validation, no prefetch: a plain cache whose
            // entries live exactly their TTL. Queries are logged with a Unix timestamp.
            let conf = format!(
                r#"server:
    interface: {ip}@{port}
    port: {port}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    use-syslog: no
    logfile: ""
    log-time-ascii: no
    verbosity: 1
    log-queries: yes
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    num-threads: 1
    do-ip6: no
    module-config: "iterator"
    prefetch: no
    qname-minimisation: no
    auto-trust-anchor-file: ""
    # "test." is a special-use domain that unbound answers NXDOMAIN for by default.
    local-zone: "test." nodefault
remote-control:
    control-enable: no
stub-zone:
    name: "{zone}"
    stub-addr: {aip}@{aport}
"#,
                ip = UNBOUND_IP,
                aip = authority.ip(),
                aport = authority.port(),
            );
            let conf_path = server.dir.join("unbound.conf");
            fs::write(&conf_path, conf)?;
            let mut cmd = Command::new(&bin);
            cmd.arg("-d").arg("-c").arg(&conf_path);
            match server.spawn(cmd, zone) {
                Ok(()) => return Ok(Unbound { server }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("unbound did not start")))
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub fn log(&self) -> String {
        self.server.log()
    }

    /// Queries unbound received from 127.0.0.1 (srvlb's source address), as logged.
    pub fn queries(&self) -> Vec<LoggedQuery> {
        // "[1796131684] unbound[23772:0] info: 127.0.0.1 _x._tcp.srvlb.test. SRV IN"
        self.log()
            .lines()
            .filter_map(|line| {
                let at = line.strip_prefix('[')?.split(']').next()?.parse().ok()?;
                let rest = line.split(" info: ").nth(1)?;
                let mut words = rest.split_whitespace();
                // srvlb's queries come from 127.0.0.1; the readiness probe's from our own IP.
                let source = words.next()?.parse::<IpAddr>().ok()?;
                if source != IpAddr::V4(Ipv4Addr::LOCALHOST) {
                    return None;
                }
                let name = words.next()?.to_owned();
                let qtype = words.next()?.to_owned();
                Some(LoggedQuery { at, name, qtype })
            })
            .collect()
    }
}

/// `dnsmasq` answering SRV and address records itself.
pub struct Dnsmasq {
    server: Server,
    bin: PathBuf,
    zone: String,
    ttl: u32,
}

impl Dnsmasq {
    /// Starts dnsmasq on [`DNSMASQ_IP`], authoritative-ish for `zone` (`--local`, so unknown
    /// names get NXDOMAIN), serving `records`: dnsmasq options without the leading dashes,
    /// e.g. `srv-host=_app._tcp.srvlb.test,b1.srvlb.test,8080,10,10` and
    /// `host-record=b1.srvlb.test,127.0.0.1`. Every record has TTL `ttl`.
    pub fn start_or_skip(zone: &str, ttl: u32, records: &[String]) -> Option<Dnsmasq> {
        let Some(bin) = find_program("dnsmasq") else {
            skip_or_fail("dnsmasq is not installed (run .ci/install-deps)");
            return None;
        };
        let server = Server::new("dnsmasq", DNSMASQ_IP).expect("dnsmasq dir");
        let mut dnsmasq = Dnsmasq {
            server,
            bin,
            zone: zone.trim_end_matches('.').to_owned(),
            ttl,
        };
        let mut last = None;
        for _ in 0..3 {
            let port = port_on(DNSMASQ_IP).expect("port");
            dnsmasq.server.addr = SocketAddr::from((DNSMASQ_IP, port));
            match dnsmasq.spawn(records) {
                Ok(()) => return Some(dnsmasq),
                Err(e) => last = Some(e),
            }
        }
        panic!("starting dnsmasq failed: {last:?}");
    }

    fn spawn(&mut self, records: &[String]) -> io::Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--log-queries",
            "--log-facility=-",
            "--pid-file=",
            "--cache-size=0",
        ])
        .arg(format!("--user={}", current_user()))
        .arg(format!("--listen-address={}", DNSMASQ_IP))
        .arg(format!("--port={}", self.server.addr.port()))
        .arg(format!("--local=/{}/", self.zone))
        .arg(format!("--local-ttl={}", self.ttl));
        for r in records {
            cmd.arg(format!("--{r}"));
        }
        self.server.spawn(cmd, &format!("probe.{}", self.zone))
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub fn log(&self) -> String {
        self.server.log()
    }

    /// Stops dnsmasq: its port is then closed (queries are refused by the host).
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Restarts dnsmasq on the same address with new records.
    pub fn restart_with(&mut self, records: &[String]) -> io::Result<()> {
        self.server.stop();
        self.spawn(records)
    }

    /// Queries dnsmasq received, as `(type, name)` pairs in log order.
    pub fn queries(&self) -> Vec<(String, String)> {
        // "dnsmasq[23849]: query[SRV] _app._tcp.srvlb.test from 127.0.0.1"
        self.log()
            .lines()
            .filter_map(|line| {
                let rest = line.split("query[").nth(1)?;
                let (qtype, rest) = rest.split_once("] ")?;
                let name = rest.split_whitespace().next()?;
                Some((qtype.to_owned(), name.to_owned()))
            })
            .filter(|(_, name)| !name.starts_with("probe."))
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.server.dir
    }
}

/// The user the tests run as (dnsmasq would otherwise switch to `nobody`).
fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            let out = Command::new("id").arg("-un").output().ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "root".to_owned())
}
