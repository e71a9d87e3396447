//! What a reload swaps: services, listeners and lists change under load without breaking a
//! connection; a removed service's connections run on; a refused reload keeps the old config;
//! quick successive reloads end in the last one.

use super::*;

#[test]
fn hundred_reloads_under_load_break_nothing() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let b2 = TestBackend::start("b2", Mode::Echo);
    let (port, extra_port) = (free_port(), free_port());
    let config_a = config(&[
        service(
            "main",
            &[port],
            &[&b1, &b2],
            "balance = \"maglev\"\nconnect_timeout = \"1s\"\nidle_timeout = \"30s\"\n\
             max_connections = 1000\n[service.health]\nconsecutive_failures = 3",
        ),
        service("extra", &[extra_port], &[&b1], ""),
    ]);
    let config_b = config(&[service(
        "main",
        &[port],
        &[&b1, &b2],
        "balance = \"p2c\"\nconnect_timeout = \"2s\"\nidle_timeout = \"20s\"\n\
         max_connections = 64\nconnect_retries = 1\n[service.health]\nconsecutive_failures = 5",
    )]);
    // Connection-close lines would swamp the log this test polls; reload lines stay.
    let srvlb = Srvlb::start_with_env(&config_a, &[("SRVLB_LOG", "info,srvlb::proxy=warn")]);

    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    // Long-lived connections opened before any reload, exercised throughout.
    let mut long_lived: Vec<TcpStream> = (0..2)
        .map(|_| connect(port).expect("long-lived connect"))
        .collect();
    let long_thread = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || -> Result<u64, String> {
            let mut rounds = 0u64;
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (i, stream) in long_lived.iter_mut().enumerate() {
                    roundtrip(stream, &payload(rounds * 2 + i as u64, 64))
                        .map_err(|e| format!("long-lived #{i}, round {rounds}: {e}"))?;
                }
                rounds += 1;
                thread::sleep(Duration::from_millis(20));
            }
            for stream in long_lived {
                finish(stream)?;
            }
            Ok(rounds)
        })
    };
    let clients: Vec<_> = (0..4u64)
        .map(|id| {
            let (stop, connections) = (Arc::clone(&stop), Arc::clone(&connections));
            thread::spawn(move || -> Vec<String> {
                let mut failures = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(600);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    n += 1;
                    let len = 1 + ((id * 7919 + n * 104_729) % 16_384) as usize;
                    match exchange(port, &payload(id << 32 | n, len)) {
                        Ok(()) => {
                            connections.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("client {id} #{n}: {e}")),
                    }
                    // Paced so ephemeral ports in TIME_WAIT cannot run out on a shared host.
                    thread::sleep(Duration::from_millis(2));
                }
                failures
            })
        })
        .collect();

    let started = Instant::now();
    // Wait until load is flowing before the first reload.
    assert!(
        eventually(Duration::from_secs(10), || connections
            .load(Ordering::Relaxed)
            > 20),
        "no load flowing"
    );
    let before = connections.load(Ordering::Relaxed);
    const RELOADS: usize = 100;
    for i in 0..RELOADS {
        srvlb.write_config(if i % 2 == 0 { &config_b } else { &config_a });
        srvlb.signal("HUP");
        srvlb.wait_log_count(RELOADED, i + 1, RELOAD_TIMEOUT);
    }
    let during = connections.load(Ordering::Relaxed) - before;
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client thread"))
        .collect();
    let long_rounds = long_thread.join().expect("long-lived thread");
    let applied = srvlb.count_log(RELOADED);
    let refused = srvlb.count_log(REFUSED);
    let total = connections.load(Ordering::Relaxed);
    println!(
        "reload under load: {total} connections ({during} during the reloads), \
         {RELOADS} SIGHUPs, {applied} reloads applied, {refused} refused, \
         {} client failures, long-lived rounds {:?}, {:.1}s",
        failures.len(),
        long_rounds,
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "client failures: {failures:#?}");
    let long_rounds = long_rounds.expect("long-lived connections survive every reload");
    assert!(long_rounds > 0);
    assert_eq!(applied, RELOADS, "every SIGHUP was applied");
    assert_eq!(refused, 0);
    assert!(during > 0, "no connection overlapped the reloads");
    // The last config applied is A: the extra service is back and serving.
    assert!(serves(extra_port), "extra service of the final config");
}

#[test]
fn connections_of_a_removed_service_run_until_they_close() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let b2 = TestBackend::start("b2", Mode::Echo);
    let (main_port, old_port) = (free_port(), free_port());
    let main = service("main", &[main_port], &[&b1], "");
    let srvlb = Srvlb::start(&config(&[
        main.clone(),
        service("old", &[old_port], &[&b2], "idle_timeout = \"30s\""),
    ]));
    let mut open: Vec<TcpStream> = (0..3)
        .map(|_| connect(old_port).expect("connect to the old service"))
        .collect();
    for (i, stream) in open.iter_mut().enumerate() {
        roundtrip(stream, &payload(i as u64, 100)).expect("before reload");
    }

    srvlb.write_config(&config(std::slice::from_ref(&main)));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(refuses(old_port), "the removed service must stop accepting");
    assert!(serves(main_port));
    // Well past the reload, the old connections still carry data both ways...
    for round in 0..5u64 {
        for (i, stream) in open.iter_mut().enumerate() {
            roundtrip(stream, &payload(round * 10 + i as u64, 4096))
                .unwrap_or_else(|e| panic!("connection {i} after the reload, round {round}: {e}"));
        }
        thread::sleep(Duration::from_millis(200));
    }
    // ...and end normally when the client ends them.
    for (i, stream) in open.into_iter().enumerate() {
        finish(stream).unwrap_or_else(|e| panic!("connection {i} did not close cleanly: {e}"));
    }
    assert!(b2.accepted() >= 3);
}

#[test]
fn a_refused_reload_keeps_the_old_config_and_logs_what_check_prints() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let port = free_port();
    let good = config(&[service("main", &[port], &[&b1], "")]);
    let srvlb = Srvlb::start(&good);

    // 1. Invalid: a bad balance value on a known line.
    let bad = format!("{good}balance = \"random\"\n");
    let bad_line = bad.lines().count();
    srvlb.write_config(&bad);
    srvlb.signal("HUP");
    srvlb.wait_log(REFUSED, RELOAD_TIMEOUT);
    let check = check_error(&srvlb.config_path);
    assert!(
        check.contains(&format!("config.toml:{bad_line}:")),
        "check names file:line: {check}"
    );
    assert_eq!(check.lines().count(), 1, "one-line error: {check}");
    let logged = srvlb.log();
    assert!(
        logged
            .iter()
            .any(|l| l.contains(REFUSED) && l.contains(&format!("error={check}"))),
        "the reload error must be exactly check's text {check:?}; log:\n{}",
        logged.join("\n")
    );
    assert!(serves(port), "the old config keeps serving");

    // 2. A listener that cannot be bound: refused as a whole, so the other new address in the
    //    same config must not be listening either.
    let held = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let held_port = held.local_addr().expect("addr").port();
    let new_port = free_port();
    srvlb.write_config(&config(&[
        service("main", &[port], &[&b1], ""),
        service("more", &[new_port, held_port], &[&b1], ""),
    ]));
    srvlb.signal("HUP");
    srvlb.wait_log_count(REFUSED, 2, RELOAD_TIMEOUT);
    assert!(
        srvlb.log_contains(&format!("cannot listen on 127.0.0.1:{held_port}")),
        "bind error logged"
    );
    assert!(refuses(new_port), "nothing of a refused reload is applied");
    assert!(serves(port));
    assert_eq!(srvlb.count_log(RELOADED), 0);

    // 3. The next valid reload works.
    drop(held);
    srvlb.write_config(&config(&[
        service("main", &[port], &[&b1], ""),
        service("more", &[new_port], &[&b1], ""),
    ]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(serves(new_port));
    assert!(serves(port));
    // NOTIFY_SOCKET is unset here: notifying must be a silent no-op.
    assert!(!srvlb.log_contains("sd_notify failed"));
}

#[test]
fn a_listener_added_and_one_removed_change_nothing_else() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let (kept, removed, added) = (free_port(), free_port(), free_port());
    let srvlb = Srvlb::start(&config(&[service("main", &[kept, removed], &[&b1], "")]));
    assert!(serves(kept) && serves(removed));
    assert!(refuses(added), "not yet configured");
    let mut on_kept = connect(kept).expect("connect kept");
    let mut on_removed = connect(removed).expect("connect removed");
    roundtrip(&mut on_kept, b"before").expect("kept before");
    roundtrip(&mut on_removed, b"before").expect("removed before");

    srvlb.write_config(&config(&[service("main", &[kept, added], &[&b1], "")]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(serves(added), "the new address accepts");
    assert!(
        refuses(removed),
        "the removed address refuses after the reload"
    );
    assert!(serves(kept));
    roundtrip(&mut on_kept, b"after").expect("open connection on the kept address");
    roundtrip(&mut on_removed, b"after").expect("open connection on the removed address");
    finish(on_kept).expect("kept closes cleanly");
    finish(on_removed).expect("removed closes cleanly");

    // The kept address was bound once, at start: its socket was never replaced.
    let log = srvlb.log();
    let bound = |port: u16| {
        let field = format!("listen=127.0.0.1:{port}");
        log.iter()
            .filter(|l| l.contains("listening") && l.contains(&field))
            .count()
    };
    assert_eq!(bound(kept), 1, "log:\n{}", log.join("\n"));
    assert_eq!(bound(added), 1);
    let removed_field = format!("listen=127.0.0.1:{removed}");
    let closed: Vec<_> = log
        .iter()
        .filter(|l| l.contains("listener removed"))
        .collect();
    assert_eq!(closed.len(), 1, "only one listener closed: {closed:?}");
    assert!(closed[0].contains(&removed_field));
}

#[test]
fn an_allow_list_change_applies_to_new_connections_only() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let port = free_port();
    let srvlb = Srvlb::start(&config(&[service("main", &[port], &[&b1], "")]));
    let mut open = connect(port).expect("connect");
    roundtrip(&mut open, b"before").expect("before");

    // Only a network the test client is not in may connect now.
    srvlb.write_config(&config(&[service(
        "main",
        &[port],
        &[&b1],
        "allow = [\"10.0.0.0/8\"]",
    )]));
    srvlb.signal("HUP");
    srvlb.wait_log(RELOADED, RELOAD_TIMEOUT);
    assert!(
        !serves(port),
        "a new connection from 127.0.0.1 is denied at once"
    );
    roundtrip(&mut open, b"after").expect("the open connection is not cut");
    finish(open).expect("closes cleanly");
}

#[test]
fn quick_successive_reloads_end_in_the_last_config() {
    let b1 = TestBackend::start("b1", Mode::Echo);
    let (port, p_x, p_y) = (free_port(), free_port(), free_port());
    let main = service("main", &[port], &[&b1], "");
    let with = |extra_port: u16, balance: &str| {
        config(&[
            main.clone(),
            service(
                "extra",
                &[extra_port],
                &[&b1],
                &format!("balance = \"{balance}\""),
            ),
        ])
    };
    let srvlb = Srvlb::start(&config(std::slice::from_ref(&main)));
    // Each round sends two HUPs back to back with different files; whichever way they
    // interleave with the reload they trigger (coalesced before the read, or the second
    // arriving during apply), the state must end as the second file says.
    const ROUNDS: usize = 8;
    let mut seen = 0;
    for round in 0..ROUNDS {
        let (first, last) = if round % 2 == 0 {
            (p_x, p_y)
        } else {
            (p_y, p_x)
        };
        srvlb.write_config(&with(first, "maglev"));
        srvlb.signal("HUP");
        srvlb.write_config(&with(last, "p2c"));
        srvlb.signal("HUP");
        srvlb.wait_log_count(RELOADED, seen + 1, RELOAD_TIMEOUT);
        let settled = eventually(Duration::from_secs(10), || serves(last) && refuses(first));
        // Let any reload still pending happen, then make sure it did not undo the last file.
        thread::sleep(Duration::from_millis(300));
        assert!(
            settled && serves(last) && refuses(first),
            "round {round}: final state is not the last file's; log:\n{}",
            srvlb.log().join("\n")
        );
        seen = srvlb.count_log(RELOADED);
    }
    // Two HUPs give one reload (coalesced) or two, never more.
    assert!((ROUNDS..=2 * ROUNDS).contains(&seen), "{seen} reloads");
    assert!(serves(port));
    assert_eq!(srvlb.count_log(REFUSED), 0);
    println!("{ROUNDS} double-HUP rounds -> {seen} reloads applied");
}
