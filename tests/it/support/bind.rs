//! A real DNS server for end-to-end tests: Debian's BIND 9 `named`, run on a private
//! loopback port with one primary zone that tests change through `nsupdate`.
//!
//! Why a real server next to the in-process `hickory-server` one: it checks that srvlb
//! copes with what a production resolver actually sends (TTL handling, TCP fallback,
//! SERVFAIL/refused while down) and that dynamic updates (RFC 2136) reach the balancer.
//!
//! Each [`Named`] owns a fresh directory under [`std::env::temp_dir`] holding the config,
//! zone file, journal (`.jnl`) and log. Dropping it kills `named` (SIGTERM, then SIGKILL
//! after a grace period) and removes the directory, also when the test panics. Only a
//! SIGKILL of the test process itself can leak a `named`; it then keeps serving on a
//! high loopback port until killed, which harms nothing else.
//!
//! Tests use [`Named::start_or_skip`]: when bind9 is not installed they are skipped with a
//! loud message on a developer machine, but fail under CI (`CI=true`), where
//! `.ci/install-deps` must have installed it.
//!
//! Gotchas found while writing this (BIND 9.18 on Debian 12):
//! * `named` runs fine as root without `-u`; we never pass `-u`, so it runs as whoever
//!   runs the tests and can write its own temp directory.
//! * Debian ships an AppArmor profile for `/usr/sbin/named` that only allows paths such as
//!   `/etc/bind`, `/var/cache/bind`, `/var/lib/bind`. Where that profile is *enforced*
//!   (an AppArmor host, not a plain container), `named` cannot read a config in /tmp, so
//!   the base directory moves to `/var/cache/bind` (allowed `lrw`); `SRVLB_NAMED_DIR`
//!   overrides the choice.
//! * Dynamic updates are written to `<zone file>.jnl` before they are answered; on restart
//!   `named` replays the journal, so updates survive [`Named::stop`]/[`Named::restart`]
//!   without `rndc freeze/sync` (we have no control channel anyway).
//! * `notify no`: otherwise `named` sends NOTIFY to the zone's NS (`ns1` = 127.0.0.1) on
//!   port 53 after each update, i.e. to whatever happens to listen there.
//! * When the port is taken `named` exits ("unable to listen on any configured
//!   interfaces"); [`Named::start`] then retries on a fresh port.

use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long `named` gets to answer its first SOA query after being spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `named` gets to exit after SIGTERM before it is SIGKILLed.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// Upper bound on one `nsupdate` run (its own timeouts are set lower, see `update`).
const NSUPDATE_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at `start` when `named` cannot bind the port we picked (see [`free_port`]).
const START_ATTEMPTS: usize = 3;

const LOG_FILE: &str = "named.log";
const ZONE_FILE: &str = "db.zone";

/// A running (or, after [`Named::stop`], stopped) `named` serving one zone on
/// 127.0.0.1:[`Named::addr`] over UDP and TCP.
pub struct Named {
    dir: PathBuf,
    port: u16,
    /// Absolute zone name with trailing dot, e.g. `srvlb.test.`.
    zone: String,
    named_bin: PathBuf,
    child: Option<Child>,
}

impl Named {
    /// Starts `named` serving `zone` with SOA, `NS ns1`, `ns1 A 127.0.0.1` plus `records`
    /// (zone-file lines relative to the zone, e.g. `_pg._tcp 5 IN SRV 10 10 5432 b1`).
    ///
    /// Returns `None` when `named` is not installed; see [`Named::start_or_skip`] for the
    /// skip-or-fail rule. Returns once `named` answers a SOA query for the zone.
    pub fn start(zone: &str, records: &[&str]) -> Option<io::Result<Named>> {
        let named_bin = find_program("named")?;
        Some(Self::start_with(named_bin, zone, records))
    }

    /// [`Named::start`] plus the project rule for a missing bind9: skip (return `None`
    /// after a loud message) on a developer machine, panic under CI. Also panics when
    /// `named` is installed but fails to start, because that is a real failure.
    pub fn start_or_skip(zone: &str, records: &[&str]) -> Option<Named> {
        match Self::start(zone, records) {
            Some(Ok(named)) => Some(named),
            Some(Err(e)) => panic!("starting named failed: {e}"),
            None => {
                skip_or_fail("bind9 `named` is not installed (run .ci/install-deps)");
                None
            }
        }
    }

    fn start_with(named_bin: PathBuf, zone: &str, records: &[&str]) -> io::Result<Named> {
        let zone = if zone.ends_with('.') {
            zone.to_owned()
        } else {
            format!("{zone}.")
        };
        let dir = unique_dir()?;
        // From here on `named` owns the directory: its Drop removes it on every error path.
        let mut named = Named {
            dir,
            port: 0,
            zone,
            named_bin,
            child: None,
        };
        named.write_zone_file(records)?;

        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            named.port = free_port()?;
            named.write_config()?;
            match named.spawn_and_wait() {
                Ok(()) => return Ok(named),
                // Someone grabbed the port between free_port() and named's bind: retry.
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("named did not start")))
    }

    /// The server's address: 127.0.0.1 and its port, UDP and TCP.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's temp directory (config, zone file, journal, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `named` is running (not stopped and not exited on its own).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Applies one dynamic update (RFC 2136) with `nsupdate`. `commands` are nsupdate
    /// lines without `server`/`zone`/`send`, which are added here, e.g.
    /// `update add _pg._tcp.srvlb.test. 5 IN SRV 10 10 5432 b1.srvlb.test.` or
    /// `update delete b1.srvlb.test. A`. Names should be absolute (trailing dot).
    /// All lines go out in one message, so they apply atomically.
    ///
    /// Fails with nsupdate's stderr when it exits non-zero (syntax error, refused, server
    /// down), or after [`NSUPDATE_TIMEOUT`].
    pub fn update(&self, commands: &[&str]) -> io::Result<()> {
        let nsupdate = find_program("nsupdate")
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "nsupdate not installed"))?;
        let mut script = format!("server 127.0.0.1 {}\nzone {}\n", self.port, self.zone);
        for c in commands {
            script.push_str(c);
            script.push('\n');
        }
        script.push_str("send\n");

        // stderr goes to a file rather than a pipe so that the deadline loop below never
        // blocks on a full pipe; nsupdate prints little, but this keeps it simple.
        let err_path = self.dir.join(format!("nsupdate-{}.err", next_counter()));
        let err_file = fs::File::create(&err_path)?;
        // -t: overall timeout for the update; -u/-r: UDP retry interval and count. The
        // defaults (300 s / 3 s x 3) would stall a test for minutes while `named` is down.
        let mut child = Command::new(nsupdate)
            .args(["-t", "3", "-u", "1", "-r", "2"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            // Dropping stdin closes it: nsupdate then runs the script and exits.
            if let Err(e) = stdin.write_all(script.as_bytes()) {
                // Don't leave the child behind; its stderr says why it quit early.
                let _ = child.kill();
                let _ = child.wait();
                let stderr = fs::read_to_string(&err_path).unwrap_or_default();
                let _ = fs::remove_file(&err_path);
                return Err(io::Error::new(
                    e.kind(),
                    format!("writing to nsupdate: {e}: {}", stderr.trim()),
                ));
            }
        }
        let status = wait_deadline(&mut child, NSUPDATE_TIMEOUT)?;
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        let _ = fs::remove_file(&err_path);
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(io::Error::other(format!(
                "nsupdate failed ({s}): {}\nscript:\n{script}",
                stderr.trim()
            ))),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nsupdate timed out after {NSUPDATE_TIMEOUT:?}: {}",
                        stderr.trim()
                    ),
                ))
            }
        }
    }

    /// Kills `named` (simulating a DNS outage) but keeps its directory, zone, journal and
    /// port, so that [`Named::restart`] resumes where it stopped. Idempotent.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child);
        }
    }

    /// Starts `named` again on the same port, serving the zone as last updated (the
    /// journal is replayed). Stops it first if it is running.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.spawn_and_wait()
    }

    /// The `named` log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join(LOG_FILE)).unwrap_or_default()
    }

    fn write_zone_file(&self, records: &[&str]) -> io::Result<()> {
        // Short TTLs and SOA minimum (negative-caching TTL) so that resolvers under test
        // see changes quickly. Serial 1: named increments it on each dynamic update.
        let mut zone = format!(
            "$ORIGIN {zone}\n$TTL 5\n\
             @ IN SOA ns1 hostmaster 1 3600 600 86400 5\n\
             @ IN NS ns1\n\
             ns1 IN A 127.0.0.1\n",
            zone = self.zone
        );
        for r in records {
            zone.push_str(r);
            zone.push('\n');
        }
        fs::write(self.dir.join(ZONE_FILE), zone)
    }

    fn write_config(&self) -> io::Result<()> {
        let d = self.dir.display();
        // Everything named writes stays in our directory; no rndc channel (controls {}),
        // IPv4 loopback only, authoritative only.
        let conf = format!(
            r#"options {{
    directory "{d}";
    pid-file "{d}/named.pid";
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
}};
controls {{ }};
zone "{zone}" {{
    type primary;
    file "{d}/{ZONE_FILE}";
    allow-update {{ 127.0.0.1; }};
}};
"#,
            port = self.port,
            zone = self.zone,
        );
        fs::write(self.dir.join("named.conf"), conf)
    }

    /// Spawns `named` on `self.port` and waits until it answers for the zone.
    fn spawn_and_wait(&mut self) -> io::Result<()> {
        // Append, so that the log of a previous run (before a restart) stays readable.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        // -g: foreground, all logging to stderr (which goes to our log file). Unlike -f
        // with a logging {} block this also captures errors from before the config is
        // parsed, which -f would send to syslog. -4: IPv4 only. -n 1: one worker thread,
        // since several servers may run at once on a 2-core machine.
        let child = Command::new(&self.named_bin)
            .arg("-g")
            .arg("-4")
            .args(["-n", "1"])
            .arg("-c")
            .arg(self.dir.join("named.conf"))
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
                let log = self.log();
                let kind = if log.contains("unable to listen") || log.contains("address in use") {
                    io::ErrorKind::AddrInUse
                } else {
                    io::ErrorKind::Other
                };
                return Err(io::Error::new(
                    kind,
                    format!(
                        "named exited with {status} on port {}; log:\n{log}",
                        self.port
                    ),
                ));
            }
            if self.answers_soa() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "named did not answer within {READY_TIMEOUT:?} on port {}; log:\n{}",
                        self.port,
                        self.log()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True when named gives an authoritative NOERROR answer to `SOA <zone>` over UDP and
    /// accepts a TCP connection, i.e. the zone is loaded and both transports are up.
    fn answers_soa(&self) -> bool {
        let Ok(sock) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)) else {
            return false;
        };
        if sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .is_err()
        {
            return false;
        }
        let id = (next_counter() & 0xffff) as u16;
        if sock
            .send_to(&soa_query(id, &self.zone), self.addr())
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 512];
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            return false;
        };
        let r = &buf[..n];
        let ok = n >= 12
            && u16::from_be_bytes([r[0], r[1]]) == id
            && r[2] & 0x80 != 0 // QR: a response
            && r[2] & 0x04 != 0 // AA: the zone is loaded, not just the socket open
            && r[3] & 0x0f == 0 // RCODE NOERROR
            && u16::from_be_bytes([r[6], r[7]]) >= 1; // ANCOUNT
        ok && TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok()
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Picks a loopback port that is free for both UDP and TCP right now.
///
/// Race: the port is released before `named` binds it, so another process may take it in
/// between. `Named::start` handles that by retrying with a fresh port when `named` fails
/// to bind. The kernel hands out ephemeral ports in sequence-ish order, so a collision
/// needs a concurrent bind to hit the same port in that short window: rare.
pub fn free_port() -> io::Result<u16> {
    let mut last_err = None;
    for attempt in 0..50u64 {
        let port = port_below_ephemeral_range(attempt);
        // Free for both UDP and TCP right now.
        let _udp = match UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(udp) => udp,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(_tcp) => return Ok(port),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no free port")))
}

/// A port below the kernel's ephemeral range. A port the kernel hands out for outgoing
/// connections (as `bind(:0)` does) can be taken by one of the many client sockets a test
/// opens while named is stopped, and named's restart on that port then fails with "address
/// in use"; ports below the range are never handed out implicitly.
fn port_below_ephemeral_range(attempt: u64) -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 {
        (10_000, low)
    } else {
        (low.saturating_sub(8_000).max(1024), low)
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 20)
        ^ attempt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let span = u64::from(to - from).max(1);
    from + (splitmix(seed) % span) as u16
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The project's rule for tests that need an external tool that is missing: skip with a
/// loud message on a developer machine, fail under CI where it must be installed.
pub fn skip_or_fail(reason: &str) {
    if is_ci() {
        panic!("{reason}; CI=true, so this is a failure, not a skip");
    }
    // Written to the stderr handle, not with eprintln!: libtest captures the macros and
    // would hide the message for a test that "passes" by skipping.
    let _ = writeln!(io::stderr(), "\n*** SKIPPING TEST: {reason} ***\n");
}

fn is_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// Finds a program on PATH, or in the sbin directories, which are not on a non-root
/// user's PATH on Debian although `named` lives there.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn next_counter() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Creates a fresh directory unique across processes (pid) and servers within one
/// process (counter), with the time so that a stale directory from a recycled pid of a
/// killed run does not collide.
fn unique_dir() -> io::Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!(
        "srvlb-named-{}-{}-{nanos}",
        std::process::id(),
        next_counter()
    );
    let dir = base_dir().join(name);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Where server directories go: `SRVLB_NAMED_DIR` if set; `/var/cache/bind` when AppArmor
/// enforces Debian's named profile (it denies named everything under /tmp); else the
/// system temp dir.
fn base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SRVLB_NAMED_DIR") {
        return PathBuf::from(dir);
    }
    // Readable by root only, which is who can load AppArmor profiles; a non-root reader
    // gets an error and falls through to temp_dir (then set SRVLB_NAMED_DIR if needed).
    let enforced = fs::read_to_string("/sys/kernel/security/apparmor/profiles")
        .map(|p| {
            p.lines()
                .any(|l| l.starts_with("named ") && l.ends_with("(enforce)"))
        })
        .unwrap_or(false);
    let cache = Path::new("/var/cache/bind");
    if enforced && cache.is_dir() {
        return cache.to_path_buf();
    }
    std::env::temp_dir()
}

/// A minimal DNS query message: `<zone> IN SOA`, no recursion desired.
fn soa_query(id: u16, zone: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0, 0]); // flags: standard query, RD=0
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT=1, AN/NS/AR=0
    for label in zone.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 6, 0, 1]); // QTYPE=SOA, QCLASS=IN
    q
}

/// Waits up to `timeout` for `child` to exit; `Ok(None)` when it is still running.
/// Ends a server the tests started: SIGTERM, so it shuts down cleanly (named closes its
/// journal and removes its pid file), SIGKILL if it is still there after `TERM_GRACE`, then
/// reaps it so no zombie holds the pid. std only offers SIGKILL; the kill(1) binary avoids a
/// libc dependency.
pub fn terminate(mut child: Child) {
    if let Ok(None) = child.try_wait() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(wait_deadline(&mut child, TERM_GRACE), Ok(Some(_))) {
            let _ = child.kill();
        }
    }
    let _ = child.wait();
}

pub fn wait_deadline(
    child: &mut Child,
    timeout: Duration,
) -> io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
