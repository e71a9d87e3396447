//! Test harness: a spawned `srvlb` process with its config in a temp dir, backends that say
//! who they are, and small client helpers. Everything listens on 127.0.0.1 only.
//!
//! The process is here (`Srvlb`); the backends (`backends.rs`), client helpers (`clients.rs`)
//! and ready-made set-ups (`fixtures.rs`) are re-exported, so `support::harness::X` names all.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod backends;
mod clients;
mod fixtures;

pub use backends::*;
pub use clients::*;
pub use fixtures::*;

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
