//! Stopping: a second stop signal ends the drain at once; the worker threads.

use super::*;

#[test]
fn a_second_stop_signal_ends_the_drain_at_once() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let port = free_port();
    let mut srvlb = Srvlb::start(&format!(
        "[global]\nshutdown_grace = \"30s\"\n{}",
        service("main", &[port], &[&b1], "")
    ));
    let mut open = connect(port).expect("connect");
    roundtrip(&mut open, b"before").expect("served");
    srvlb.signal("TERM");
    srvlb.wait_log("draining connections", Duration::from_secs(10));
    assert_eq!(
        srvlb.wait_exit(Duration::from_millis(500)),
        None,
        "the first signal drains: the open connection keeps srvlb running"
    );
    srvlb.signal("TERM");
    let started = Instant::now();
    // Well under the 30 s grace; the margin is for a loaded machine.
    assert_eq!(
        srvlb.wait_exit(Duration::from_secs(10)),
        Some(0),
        "a second SIGTERM must end the drain and exit 0"
    );
    println!(
        "exited {:.2}s after the second SIGTERM",
        started.elapsed().as_secs_f64()
    );
    assert!(srvlb.log_contains("second stop signal"));
    drop(open);
}

/// The names of srvlb's data-path worker threads, from /proc.
fn worker_threads(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim().to_owned())
        .filter(|comm| comm.starts_with("srvlb-worker-"))
        .collect();
    names.sort();
    names
}

#[test]
fn connections_on_every_worker_survive_a_reload_that_asks_for_other_workers() {
    let echo = TestBackend::start("echo", Mode::Echo);
    let port = free_port();
    let with_workers = |workers: u32, extra: &str| {
        format!(
            "[global]\nshutdown_grace = \"5s\"\nworkers = {workers}\n{}",
            service("app", &[port], &[&echo], extra)
        )
    };
    let srvlb = Srvlb::start(&with_workers(3, ""));
    assert_eq!(
        worker_threads(srvlb.pid()),
        ["srvlb-worker-0", "srvlb-worker-1", "srvlb-worker-2"],
        "workers = 3 must run three data-path threads"
    );
    let mut open: Vec<TcpStream> = (0..60)
        .map(|i| {
            let mut stream = connect(port).expect("connect");
            roundtrip(&mut stream, &payload(i, 300)).expect("before the reload");
            stream
        })
        .collect();

    srvlb.write_config(&with_workers(1, "idle_timeout = \"10m\""));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(
        srvlb.log_contains("global.workers is read at start"),
        "a changed worker count must be reported as taking effect at restart"
    );
    assert_eq!(
        worker_threads(srvlb.pid()).len(),
        3,
        "the running workers stay"
    );
    for (i, stream) in open.iter_mut().enumerate() {
        roundtrip(stream, &payload(1000 + i as u64, 5000))
            .unwrap_or_else(|e| panic!("connection {i} after the reload: {e}"));
    }
    assert!(serves(port), "new clients after the reload");
    for (i, stream) in open.drain(..).enumerate() {
        finish(stream).unwrap_or_else(|e| panic!("connection {i} did not close cleanly: {e}"));
    }
}
