//! Soaks: srvlb held at its limits for a while, measured from outside (/proc of the srvlb
//! process, /metrics, /status) and checked for what a user would notice: failed clients,
//! descriptors not given back, a core spinning, memory that keeps growing.
//!
//! - many concurrent connections through one service (as many as the descriptor limit
//!   allows with `SRVLB_SOAK=long`, 2,000 by default);
//! - `ulimit -n 256` with 400 clients: no spinning, no ejection, served again afterwards;
//! - DNS changing every second under 200 long-lived connections: memory flat;
//! - SIGHUPs under load: no failure, no growth.
//!
//! The default variants are bounded to a few seconds each so `scripts/test` stays quick;
//! `SRVLB_SOAK=long` runs the full sizes (about 2 minutes; run them alone, as in
//! `SRVLB_SOAK=long cargo test --test it soak:: -- --nocapture`, since the largest one uses
//! nearly every descriptor this process may open). The figures are printed (see them with
//! `--nocapture`). The soaks run one at a time: they share the test process's
//! descriptors and measure CPU.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::harness::{Dns, ManyEcho, SRV_NAME, Srvlb, eventually, free_port, http_get};
use serde_json::Value;

fn long() -> bool {
    std::env::var("SRVLB_SOAK").is_ok_and(|v| v == "long")
}

/// One soak at a time (see the module doc).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn status(admin: SocketAddr) -> Value {
    serde_json::from_str(&http_get(admin, "/status")).expect("status is JSON")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A config with one service "app" over static `backends` and an admin endpoint; proxy
/// close lines are left out of the log (thousands of them would only cost time).
fn static_config(
    admin: SocketAddr,
    listen: SocketAddr,
    backends: &[SocketAddr],
    extra: &str,
) -> String {
    let statics: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[global]\nadmin = \"{admin}\"\nshutdown_grace = \"1s\"\n\n[[service]]\nname = \"app\"\n\
         listen = [\"{listen}\"]\nstatic = [{}]\n{extra}\n",
        statics.join(", ")
    )
}

const QUIET: &[(&str, &str)] = &[("SRVLB_LOG", "info,srvlb::proxy=warn")];

fn wait_backends(admin: SocketAddr, n: usize) {
    assert!(
        eventually(Duration::from_secs(10), || {
            status(admin)["services"][0]["backends"]
                .as_array()
                .is_some_and(|b| b.len() == n)
        }),
        "srvlb never loaded its {n} backends"
    );
}

/// Sends one byte and expects it back within `timeout`.
fn roundtrip(stream: &mut TcpStream, byte: u8, timeout: Duration) -> Result<(), String> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&[byte])
        .map_err(|e| format!("send: {e}"))?;
    let mut b = [0u8; 1];
    match stream.read(&mut b) {
        Ok(1) if b[0] == byte => Ok(()),
        Ok(1) => Err(format!("sent {byte}, got {}", b[0])),
        Ok(_) => Err("closed".into()),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// Raises this process's soft descriptor limit to the hard one (srvlb, spawned from here,
/// inherits it); returns the new soft limit.
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
    getrlimit(Resource::Nofile).current.unwrap_or(1 << 20)
}

/// Descriptors held by idle splice pipes (two per pipe), from /metrics; 0 where none.
/// Descriptors srvlb keeps for reuse, which are no leak: its idle splice pipes and its
/// workers' io_uring rings (set up on first use), two descriptors each.
fn kept_fds(admin: SocketAddr) -> usize {
    let metrics = http_get(admin, "/metrics");
    let kept =
        |name| crate::support::harness::metric_value(&metrics, name).map_or(0, |n| n as usize);
    2 * kept("srvlb_splice_pipes_idle ") + 2 * kept("srvlb_io_uring_rings ")
}

#[test]
fn soak_many_connections_are_held_and_all_released() {
    let _serial = serial();
    let own_limit = raise_nofile();
    let backend = ManyEcho::start();
    let (admin, listen) = (local(), local());
    let srvlb = Srvlb::start_with_env(
        &static_config(admin, listen, &[backend.addr], "max_connections = 100000"),
        QUIET,
    );
    wait_backends(admin, 1);
    let cap = status(admin)["process"]["connection_cap"]
        .as_u64()
        .expect("connection_cap") as usize;
    // This process holds both ends srvlb does not: the client and the backend's socket.
    let fit_here = (own_limit as usize).saturating_sub(400) / 2;
    let target = if long() {
        cap.min(fit_here)
    } else {
        2000.min(cap).min(fit_here)
    };
    let (fds_before, rss_before) = (srvlb.fd_count(), srvlb.rss_kib());
    let pipes_before = kept_fds(admin);

    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (clients, failures) = runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut clients = Vec::with_capacity(target);
        let mut failures = Vec::new();
        // In batches, so the listen backlog and SYN queue never overflow.
        while clients.len() < target {
            let batch = (target - clients.len()).min(250);
            let mut set = tokio::task::JoinSet::new();
            for i in 0..batch {
                set.spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(listen).await?;
                    let byte = (i % 251) as u8;
                    s.write_all(&[byte]).await?;
                    let mut b = [0u8; 1];
                    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut b))
                        .await
                        .map_err(|_| std::io::Error::other("no echo within 20 s"))??;
                    if b[0] != byte {
                        return Err(std::io::Error::other("wrong echo"));
                    }
                    Ok::<_, std::io::Error>(s)
                });
            }
            while let Some(joined) = set.join_next().await {
                match joined {
                    Ok(Ok(s)) => clients.push(s),
                    Ok(Err(e)) => failures.push(e.to_string()),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            if failures.len() > 10 {
                break;
            }
        }
        (clients, failures)
    });
    let opened_in = started.elapsed();
    let (fds_held, rss_held) = (srvlb.fd_count(), srvlb.rss_kib());
    let proxied = status(admin)["process"]["proxied_connections"].as_u64();
    drop(clients);
    // Idle splice pipes kept for reuse (at most 32) are not a leak.
    let released = eventually(Duration::from_secs(30), || {
        srvlb.fd_count().saturating_sub(kept_fds(admin)) <= fds_before - pipes_before
            && backend.open() == 0
    });
    let (fds_after, rss_after) = (srvlb.fd_count(), srvlb.rss_kib());
    let pipes_after = kept_fds(admin);
    println!(
        "soak many connections: {target} held (cap {cap}, own limit {own_limit}) in {:.1}s; \
         srvlb fds {fds_before} -> {fds_held} -> {fds_after} ({pipes_after} in idle \
         splice pipes); RSS {:.1} -> {:.1} -> {:.1} MiB \
         ({:.1} KiB per connection); proxied {proxied:?}; failures {}",
        opened_in.as_secs_f64(),
        mib(rss_before),
        mib(rss_held),
        mib(rss_after),
        (rss_held.saturating_sub(rss_before)) as f64 / target.max(1) as f64,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "clients failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        proxied,
        Some(target as u64),
        "srvlb proxies every held client"
    );
    // Two per connection; the baseline itself moves by a few (idle pipes, an admin request).
    assert!(
        fds_held + 8 >= fds_before + 2 * target,
        "two descriptors per connection: {fds_before} -> {fds_held}"
    );
    assert!(
        released,
        "descriptors not released: {fds_before} before, {fds_after} after"
    );
    // Generous: a debug build with tokio tasks and no buffers for idle connections.
    let per_connection = rss_held.saturating_sub(rss_before) / target.max(1) as u64;
    assert!(
        per_connection < 64,
        "{per_connection} KiB of RSS per idle connection"
    );
}

#[test]
fn soak_descriptor_exhaustion_does_not_spin_or_eject() {
    let _serial = serial();
    let backend = ManyEcho::start();
    let (admin, listen) = (local(), local());
    let config = static_config(admin, listen, &[backend.addr], "");
    let srvlb = Srvlb::start_with_nofile(&config, 256);
    wait_backends(admin, 1);
    let cap = status(admin)["process"]["connection_cap"]
        .as_u64()
        .expect("connection_cap");
    let fds_before = srvlb.fd_count();

    let clients: Vec<TcpStream> = (0..400)
        .map(|i| {
            let mut s =
                TcpStream::connect_timeout(&listen, Duration::from_secs(5)).expect("connect");
            s.write_all(&[i as u8]).expect("send");
            s
        })
        .collect();
    assert!(
        eventually(
            Duration::from_secs(10),
            || status(admin)["process"]["proxied_connections"].as_u64() == Some(cap)
        ),
        "srvlb did not fill its cap of {cap}"
    );
    let window = if long() {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(3)
    };
    let (cpu0, t0) = (srvlb.cpu_time(), Instant::now());
    thread::sleep(window);
    let cpu = (srvlb.cpu_time() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let st = status(admin);
    let listener = &st["listeners"][0];
    let backend_state = &st["services"][0]["backends"][0];
    let fds_held = srvlb.fd_count();
    println!(
        "soak ulimit -n 256, 400 clients: cap {cap}, proxied {}, backlog {}, paused {}; \
         srvlb CPU {:.1}% of a core over {:.0}s; fds {fds_before} -> {fds_held}; backend {} \
         (ejections {}, connect failures {})",
        st["process"]["proxied_connections"],
        listener["backlog"],
        listener["paused_reason"],
        cpu * 100.0,
        window.as_secs_f64(),
        backend_state["state"],
        backend_state["ejections"],
        backend_state["connect_failures"],
    );
    assert!(
        cpu < 0.25,
        "srvlb uses {:.0}% of a core while waiting",
        cpu * 100.0
    );
    assert_eq!(backend_state["state"], "active");
    assert_eq!(backend_state["ejections"], 0);
    assert_eq!(backend_state["connect_failures"], 0);
    assert!(
        fds_held < 256,
        "{fds_held} descriptors: the reserve is not kept"
    );
    assert_eq!(listener["paused_reason"], "fd_cap", "{listener}");

    // The first `cap` clients (accepted in connect order) leave: the next ones in the
    // backlog are served now, and their first byte comes back.
    let mut clients = clients;
    let waiting = clients.split_off(cap as usize);
    drop(clients);
    let mut served_later = 0;
    for (i, mut c) in waiting.into_iter().enumerate().take(10) {
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut b = [0u8; 1];
        if matches!(c.read(&mut b), Ok(1)) && b[0] == (cap as usize + i) as u8 {
            served_later += 1;
        }
    }
    assert!(
        eventually(Duration::from_secs(20), || {
            status(admin)["process"]["proxied_connections"].as_u64() == Some(0)
        }),
        "connections not released"
    );
    let mut fresh: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect_timeout(&listen, Duration::from_secs(5)).expect("connect"))
        .collect();
    let ok = fresh
        .iter_mut()
        .map(|c| roundtrip(c, 1, Duration::from_secs(10)))
        .filter(Result::is_ok)
        .count();
    println!("  waiting clients served later: {served_later}; fresh clients served: {ok}/20");
    assert_eq!(ok, 20, "not serving again after the clients closed");
    assert_eq!(
        served_later, 10,
        "clients that waited in the backlog were not served"
    );
}

#[test]
fn soak_dns_churn_under_long_lived_connections_keeps_memory_flat() {
    let _serial = serial();
    let backends: Vec<ManyEcho> = (0..4).map(|_| ManyEcho::start()).collect();
    let names = ["c0", "c1", "c2", "c3"];
    let dns = Dns::start();
    let publish = |step: usize| {
        // Three of four backends, weights moving: every answer differs from the last.
        let answer: Vec<(&str, u16, u16, u16)> = (0..4)
            .filter(|i| *i != step % 4)
            .map(|i| (names[i], backends[i].port(), 1, 1 + ((step + i) % 5) as u16))
            .collect();
        dns.publish_ports(SRV_NAME, 1, &answer);
    };
    publish(0);
    let (admin, listen) = (local(), local());
    let config = format!(
        "[global]\nadmin = \"{admin}\"\nshutdown_grace = \"1s\"\n\n[resolver]\nnameservers = \
         [\"{}\"]\ntimeout = \"1s\"\nmin_refresh = \"1s\"\n\n[[service]]\nname = \"app\"\n\
         listen = [\"{listen}\"]\nsrv = \"{SRV_NAME}\"\nbalance = \"p2c\"\n",
        dns.addr()
    );
    let srvlb = Srvlb::start_with_env(&config, QUIET);
    wait_backends(admin, 3);

    let mut long_lived: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect_timeout(&listen, Duration::from_secs(5)).expect("connect"))
        .collect();
    for c in &mut long_lived {
        roundtrip(c, 42, Duration::from_secs(10)).expect("long-lived connection served");
    }
    let seconds = if long() { 60 } else { 8 };
    let refreshes_before = status(admin)["services"][0]["dns"]["refreshes"]
        .as_u64()
        .unwrap_or(0);
    let mut rss = Vec::new();
    let mut failures = Vec::new();
    let started = Instant::now();
    for step in 1..=seconds {
        publish(step);
        // Every long-lived connection keeps working, whichever backend left the answer.
        for (i, c) in long_lived.iter_mut().enumerate() {
            if let Err(e) = roundtrip(c, (step % 200) as u8, Duration::from_secs(5)) {
                failures.push(format!("long-lived #{i} at {step}s: {e}"));
            }
        }
        // And new clients are served.
        match TcpStream::connect_timeout(&listen, Duration::from_secs(5)) {
            Ok(mut c) => {
                if let Err(e) = roundtrip(&mut c, 9, Duration::from_secs(5)) {
                    failures.push(format!("new client at {step}s: {e}"));
                }
            }
            Err(e) => failures.push(format!("connect at {step}s: {e}")),
        }
        rss.push(srvlb.rss_kib());
        let next = started + Duration::from_secs(step as u64);
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let st = status(admin);
    let refreshes = st["services"][0]["dns"]["refreshes"].as_u64().unwrap_or(0) - refreshes_before;
    // Memory after warm-up (the first two seconds) against the end.
    let warm = rss[1.min(rss.len() - 1)];
    let (low, high) = (
        rss[1..].iter().copied().min().unwrap_or(0),
        rss.iter().copied().max().unwrap_or(0),
    );
    let end = *rss.last().unwrap_or(&0);
    println!(
        "soak DNS churn: {seconds}s, answer changed every second, {refreshes} refreshes, 200 \
         long-lived connections; RSS after warm-up {:.1} MiB, end {:.1} MiB (min {:.1}, max \
         {:.1}); fds {}; failures {}",
        mib(warm),
        mib(end),
        mib(low),
        mib(high),
        srvlb.fd_count(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "failures: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(
        refreshes as usize >= seconds / 2,
        "DNS was not refreshed every second or so: {refreshes} in {seconds}s"
    );
    assert!(
        end.saturating_sub(warm) < 16 * 1024,
        "RSS grew from {:.1} to {:.1} MiB under DNS churn",
        mib(warm),
        mib(end)
    );
    drop(long_lived);
    let drained = eventually(Duration::from_secs(10), || {
        backends.iter().map(ManyEcho::open).sum::<usize>() == 0
    });
    assert!(drained, "connections to backends not closed");
}

#[test]
fn soak_sighups_under_load_fail_nothing_and_do_not_grow() {
    let _serial = serial();
    let backends = [ManyEcho::start(), ManyEcho::start()];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (admin, listen) = (local(), local());
    let configs = [
        static_config(
            admin,
            listen,
            &addrs,
            "balance = \"maglev\"\nidle_timeout = \"30s\"\nmax_connections = 1000",
        ),
        static_config(
            admin,
            listen,
            &addrs,
            "balance = \"p2c\"\nidle_timeout = \"20s\"\nmax_connections = 500\nconnect_retries = 1",
        ),
    ];
    let srvlb = Srvlb::start_with_env(&configs[0], QUIET);
    wait_backends(admin, 2);

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    // Long-lived connections, exercised throughout.
    {
        let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
        threads.push(thread::spawn(move || -> Vec<String> {
            let mut failures = Vec::new();
            let mut conns: Vec<TcpStream> = (0..20)
                .filter_map(|_| TcpStream::connect_timeout(&listen, Duration::from_secs(5)).ok())
                .collect();
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut round = 0u8;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (i, c) in conns.iter_mut().enumerate() {
                    match roundtrip(c, round, Duration::from_secs(5)) {
                        Ok(()) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("long-lived #{i}: {e}")),
                    }
                }
                round = round.wrapping_add(1);
                thread::sleep(Duration::from_millis(20));
            }
            failures
        }));
    }
    // Short connections, one after another.
    for _ in 0..3 {
        let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
        threads.push(thread::spawn(move || -> Vec<String> {
            let mut failures = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match TcpStream::connect_timeout(&listen, Duration::from_secs(5)) {
                    Ok(mut c) => match roundtrip(&mut c, 5, Duration::from_secs(5)) {
                        Ok(()) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("short: {e}")),
                    },
                    Err(e) => failures.push(format!("connect: {e}")),
                }
                // Paced so ephemeral ports in TIME_WAIT cannot run out.
                thread::sleep(Duration::from_millis(3));
            }
            failures
        }));
    }
    let reloads = if long() { 500 } else { 60 };
    let warm_up = reloads / 10;
    let (mut fds_warm, mut rss_warm) = (0, 0);
    let started = Instant::now();
    for i in 0..reloads {
        srvlb.write_config(&configs[(i + 1) % 2]);
        srvlb.signal("HUP");
        srvlb.wait_log_count("configuration reloaded", i + 1, Duration::from_secs(20));
        // Idle splice pipes (the pool keeps up to 32) follow the load's peaks, not the
        // reloads: they are left out of both counts.
        if i + 1 == warm_up {
            let fds = srvlb.fd_count().saturating_sub(kept_fds(admin));
            (fds_warm, rss_warm) = (fds, srvlb.rss_kib());
        }
    }
    let elapsed = started.elapsed();
    let fds_end = srvlb.fd_count().saturating_sub(kept_fds(admin));
    let rss_end = srvlb.rss_kib();
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    let refused = srvlb.count_log("reload refused");
    println!(
        "soak SIGHUP: {reloads} reloads in {:.1}s under load, {} round trips served, {} \
         failures, {refused} refused; fds after warm-up {fds_warm}, at the end {fds_end}; RSS \
         {:.1} -> {:.1} MiB",
        elapsed.as_secs_f64(),
        served.load(Ordering::Relaxed),
        failures.len(),
        mib(rss_warm),
        mib(rss_end)
    );
    assert!(
        failures.is_empty(),
        "failures: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert_eq!(refused, 0);
    assert!(served.load(Ordering::Relaxed) > 0);
    // The load's connections come and go; allow for those open at either moment.
    assert!(
        fds_end <= fds_warm + 16,
        "descriptors grew over the reloads: {fds_warm} -> {fds_end}"
    );
    assert!(
        rss_end.saturating_sub(rss_warm) < 16 * 1024,
        "RSS grew from {:.1} to {:.1} MiB over {reloads} reloads",
        mib(rss_warm),
        mib(rss_end)
    );
}
