//! The integrity soak: many concurrent streams of random sizes through srvlb, SHA-256 hashes
//! compared both ways, and no descriptor left behind.

use super::*;

const SOAK_CONNECTIONS: usize = 200;
const MAX_SIZE: u64 = 8 << 20;
const CHUNK: usize = 64 * 1024;

/// A reproducible byte stream: xorshift64, generated in chunks so nothing is held whole.
struct Stream {
    state: u64,
    left: u64,
}

impl Stream {
    fn new(seed: u64, len: u64) -> Stream {
        Stream {
            state: seed | 1,
            left: len,
        }
    }

    /// Fills up to `buf.len()` bytes; returns how many (0 at the end).
    fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = usize::try_from(self.left).map_or(buf.len(), |l| l.min(buf.len()));
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
        }
        self.left -= n as u64;
        n
    }
}

/// Sends `len` bytes of `seed`'s stream; returns their SHA-256.
fn send_stream(to: &mut TcpStream, seed: u64, len: u64) -> std::io::Result<[u8; 32]> {
    let mut stream = Stream::new(seed, len);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = stream.fill(&mut buf);
        if n == 0 {
            return Ok(hash.finalize().into());
        }
        hash.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
}

/// Reads to EOF; returns the byte count and SHA-256.
fn receive_all(from: &mut TcpStream) -> std::io::Result<(u64, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hash.finalize().into()));
        }
        total += n as u64;
        hash.update(&buf[..n]);
    }
}

/// What the backend saw on one connection: (bytes received, their hash, hash of what it sent).
type BackendRecord = (u64, [u8; 32], [u8; 32]);

/// A backend for the soak: reads a 24-byte header (id, down length, seed), then sends
/// `down` bytes and half-closes while it reads the client's bytes to EOF, both hashed.
fn soak_backend(records: Arc<Mutex<HashMap<u64, BackendRecord>>>) -> SocketAddr {
    let listener = std::net::TcpListener::bind(local(0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming().take(SOAK_CONNECTIONS * 2) {
            let Ok(mut stream) = stream else { continue };
            let records = Arc::clone(&records);
            let spawned = thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut header = [0u8; 24];
                    if stream.read_exact(&mut header).is_err() {
                        return;
                    }
                    let word = |i: usize| {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&header[i * 8..i * 8 + 8]);
                        u64::from_le_bytes(w)
                    };
                    let (id, down, seed) = (word(0), word(1), word(2));
                    let Ok(mut writer) = stream.try_clone() else {
                        return;
                    };
                    let sender = thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn(move || {
                            let hash = send_stream(&mut writer, seed ^ 0xd0d0, down);
                            let _ = writer.shutdown(Shutdown::Write);
                            hash
                        });
                    let received = receive_all(&mut stream);
                    let sent = sender.ok().and_then(|h| h.join().ok());
                    if let (Ok((n, up_hash)), Some(Ok(down_hash))) = (received, sent) {
                        records
                            .lock()
                            .expect("records")
                            .insert(id, (n, up_hash, down_hash));
                    }
                });
            drop(spawned);
        }
    });
    addr
}

/// What a soak client saw: (up bytes, up hash, down bytes, down hash).
type ClientRecord = (u64, [u8; 32], u64, [u8; 32]);

fn soak_client(
    listen: SocketAddr,
    id: u64,
    up: u64,
    down: u64,
    early_half_close: bool,
) -> std::io::Result<ClientRecord> {
    let mut stream = TcpStream::connect(listen)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let seed = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
    let mut header = Vec::with_capacity(24);
    for w in [id, down, seed] {
        header.extend_from_slice(&w.to_le_bytes());
    }
    let mut writer = stream.try_clone()?;
    let (received_tx, received_rx) = mpsc::channel::<()>();
    let sender = thread::Builder::new().stack_size(256 * 1024).spawn(
        move || -> std::io::Result<[u8; 32]> {
            writer.write_all(&header)?;
            let hash = send_stream(&mut writer, seed ^ 0xabab, up)?;
            if !early_half_close {
                // Keep our direction open until the whole reply is in: the backend
                // half-closes first on these connections.
                let _ = received_rx.recv_timeout(Duration::from_secs(60));
            }
            writer.shutdown(Shutdown::Write)?;
            Ok(hash)
        },
    )?;
    let received = receive_all(&mut stream);
    let _ = received_tx.send(());
    let up_hash = sender
        .join()
        .map_err(|_| std::io::Error::other("sender panicked"))??;
    let (down_n, down_hash) = received?;
    Ok((up, up_hash, down_n, down_hash))
}

/// Sizes from 1 byte to 8 MiB, log-uniform (every scale is covered without the average
/// being 4 MiB), with the extremes always present.
fn soak_sizes(count: usize, seed: u64) -> Vec<(u64, u64)> {
    let mut rng = Stream::new(seed, u64::MAX);
    let mut next = || {
        let mut b = [0u8; 8];
        rng.fill(&mut b);
        u64::from_le_bytes(b)
    };
    let mut log_uniform = || {
        let unit = (next() >> 11) as f64 / (1u64 << 53) as f64;
        let size = ((MAX_SIZE as f64).ln() * unit).exp();
        (size as u64).clamp(1, MAX_SIZE)
    };
    let mut sizes: Vec<(u64, u64)> = (0..count).map(|_| (log_uniform(), log_uniform())).collect();
    let extremes = [(MAX_SIZE, MAX_SIZE), (1, 1), (1, MAX_SIZE), (MAX_SIZE, 1)];
    for (slot, pair) in sizes.iter_mut().zip(extremes) {
        *slot = pair;
    }
    sizes
}

#[test]
fn integrity_soak_hashes_match_and_no_descriptor_leaks() {
    let records = Arc::new(Mutex::new(HashMap::new()));
    let backend = soak_backend(Arc::clone(&records));
    let lb = Lb::start(&[backend], "idle_timeout = \"60s\"", "");
    // Warm up (lazily created runtime resources), then take the baseline.
    soak_client(lb.listen, u64::MAX, 10, 10, true).expect("warm-up connection");
    thread::sleep(Duration::from_millis(300));
    let fds_before = lb.srvlb.fd_count();
    assert!(fds_before > 0, "cannot read /proc/PID/fd");
    let pipes_before = lb.global_metric("srvlb_splice_pipes_idle");

    let seed = 0x50a7_u64;
    let sizes = soak_sizes(SOAK_CONNECTIONS, seed);
    let total: u64 = sizes.iter().map(|(u, d)| u + d).sum();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let (tx, rx) = mpsc::channel();
    let gate = Arc::new(std::sync::Barrier::new(SOAK_CONNECTIONS));
    for (i, &(up, down)) in sizes.iter().enumerate() {
        let (tx, gate, listen) = (tx.clone(), Arc::clone(&gate), lb.listen);
        thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                gate.wait(); // all 200 at once
                let id = i as u64;
                let _ = tx.send((id, soak_client(listen, id, up, down, i % 2 == 0)));
            })
            .expect("spawn client");
    }
    drop(tx);
    let mut results = HashMap::new();
    while results.len() < SOAK_CONNECTIONS {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((id, result)) => {
                results.insert(id, result);
            }
            Err(_) => panic!(
                "soak did not finish within 60 s: {} of {SOAK_CONNECTIONS} done",
                results.len()
            ),
        }
    }
    let elapsed = started.elapsed();
    // The backend records a connection once it read the client's EOF; give it a moment.
    let soak_ids = SOAK_CONNECTIONS as u64;
    assert!(
        eventually(Duration::from_secs(10), || records
            .lock()
            .expect("records")
            .keys()
            .filter(|id| **id < soak_ids)
            .count()
            >= SOAK_CONNECTIONS),
        "the backend did not finish every connection"
    );
    let records = records.lock().expect("records").clone();
    let mut mismatches = Vec::new();
    for (id, result) in &results {
        let (up, down) = sizes[*id as usize];
        match (result, records.get(id)) {
            (
                Ok((sent_n, sent_hash, got_n, got_hash)),
                Some((b_got_n, b_got_hash, b_sent_hash)),
            ) => {
                if sent_n != b_got_n || sent_hash != b_got_hash {
                    mismatches.push(format!(
                        "#{id} up {up} B: backend got {b_got_n} B, hash differs: {}",
                        sent_hash != b_got_hash
                    ));
                }
                if *got_n != down || got_hash != b_sent_hash {
                    mismatches.push(format!(
                        "#{id} down {down} B: client got {got_n} B, hash differs: {}",
                        got_hash != b_sent_hash
                    ));
                }
            }
            (Err(e), _) => {
                mismatches.push(format!("#{id} ({up} up / {down} down): client error {e}"))
            }
            (Ok(_), None) => mismatches.push(format!("#{id}: the backend never finished")),
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {SOAK_CONNECTIONS} connections broken:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // Empty splice pipes parked in srvlb's pool (bounded, two descriptors each) are reused,
    // not leaked; srvlb reports how many it holds. So are the io_uring rings of the workers
    // (with SRVLB_DATA_PATH=io_uring), two descriptors each, set up on first use.
    let pooled = || {
        2 * lb
            .global_metric("srvlb_splice_pipes_idle")
            .saturating_sub(pipes_before)
            + 2 * lb.global_metric("srvlb_io_uring_rings")
    };
    let settled = eventually(Duration::from_secs(10), || {
        lb.srvlb.fd_count() as u64 <= fds_before as u64 + pooled()
    });
    let fds_after = lb.srvlb.fd_count();
    eprintln!(
        "soak: {SOAK_CONNECTIONS} connections, {} MiB total, {elapsed:?}, 0 mismatches, \
         fds {fds_before} -> {fds_after} ({} in pooled splice pipes)",
        total >> 20,
        pooled()
    );
    assert!(
        settled,
        "srvlb leaked descriptors: {fds_before} before, {fds_after} after"
    );
}
