//! Fault handling through the spawned srvlb binary, with real sockets on 127.0.0.1: backends
//! that die, refuse, black-hole, reset mid-stream or flap, and what clients see meanwhile.
//! srvlb logs JSON here so the tests can read ejection and re-admission fields exactly.
//! Every loop is bounded in count and time; assertions are about behaviour (who answered,
//! what was logged, what the client read), with deadlines generous enough for a loaded CI box.
//!
//! The fixtures are here; the tests are in `backends` (failing backends and ejection), `idle`
//! (the idle timeout) and `integrity` (the hashed soak).

use crate::support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::harness::{
    Mode, StaticLb as Lb, TestBackend, black_hole, eventually, http_get, who_answers,
    who_answers_from,
};

mod backends;
mod idle;
mod integrity;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn field_u64(event: &Value, name: &str) -> u64 {
    event[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} missing in {event}"))
}

/// What a bounded client loop saw.
#[derive(Debug, Default)]
struct Seen {
    answered: HashMap<String, usize>,
    /// When each successful connection was answered, with the backend's name.
    log: Vec<(Instant, String)>,
    errors: Vec<String>,
}

/// One client thread connecting over and over (from rotating source addresses, so Maglev
/// spreads them) until `stop`, at most `max` connections or `limit` of time.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Seen>,
}

impl ClientLoop {
    fn start(listen: SocketAddr, max: usize, limit: Duration) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut seen = Seen::default();
            let deadline = Instant::now() + limit;
            for i in 0..max {
                if flag.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let host = 2 + u8::try_from(i % 60).unwrap_or(0);
                let source = SocketAddr::from(([127, 0, 0, host], 0));
                match who_answers_from(listen, Some(source)) {
                    Ok(name) => {
                        *seen.answered.entry(name.clone()).or_default() += 1;
                        seen.log.push((Instant::now(), name));
                    }
                    Err(e) => seen.errors.push(format!("{:?}: {e}", Instant::now())),
                }
                // Keep the loop from monopolising a shared 2-core machine.
                thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        ClientLoop { stop, handle }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("client loop panicked")
    }
}

/// Waits until every named backend has answered through srvlb.
fn wait_all_answer(listen: SocketAddr, names: &[&str]) {
    let ok = eventually(Duration::from_secs(10), || {
        let mut seen = std::collections::HashSet::new();
        for host in 2..40u8 {
            let source = SocketAddr::from(([127, 0, 0, host], 0));
            if let Ok(name) = who_answers_from(listen, Some(source)) {
                seen.insert(name);
            }
        }
        names.iter().all(|n| seen.contains(*n))
    });
    assert!(ok, "not every backend of {names:?} answered through srvlb");
}
