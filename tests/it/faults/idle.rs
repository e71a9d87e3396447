//! The idle timeout: both legs closed when nothing moves, half-closed connections included.

use super::*;

/// A backend that holds every connection open: it reads until EOF and reports it, then
/// keeps the socket; once `probe` is set it writes a byte every 20 ms and reports whether a
/// write failed (its leg was closed by srvlb).
struct HoldBackend {
    addr: SocketAddr,
    events: mpsc::Receiver<(&'static str, Instant)>,
    probe: Arc<AtomicBool>,
}

fn hold_backend() -> HoldBackend {
    let listener = std::net::TcpListener::bind(local(0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, events) = mpsc::channel();
    let probe = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&probe);
    thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.send(("eof", Instant::now()));
                    break;
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = tx.send(("read error", Instant::now()));
                    break;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if flag.load(Ordering::Relaxed) && stream.write_all(b".").is_err() {
                let _ = tx.send(("write failed", Instant::now()));
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    HoldBackend {
        addr,
        events,
        probe,
    }
}

#[test]
fn idle_timeout_closes_both_legs() {
    let backend = hold_backend();
    let lb = Lb::start(&[backend.addr], "idle_timeout = \"1s\"", "");
    let mut client = TcpStream::connect(lb.listen).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    client.write_all(b"hi").expect("write");
    let sent = Instant::now();
    let mut buf = [0u8; 16];
    let read = client.read(&mut buf);
    let client_closed_after = sent.elapsed();
    assert!(
        matches!(read, Ok(0)),
        "expected srvlb to close the idle client leg, got {read:?}"
    );
    assert!(
        client_closed_after >= Duration::from_millis(900),
        "closed after {client_closed_after:?}, before the 1 s idle timeout"
    );
    let (what, _) = backend
        .events
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend leg was never closed");
    assert_eq!(what, "eof", "the backend leg should see srvlb's FIN");
    lb.srvlb.wait_log("idle_timeout", Duration::from_secs(5));
    eprintln!("idle: both legs closed {client_closed_after:?} after the last byte");
}

#[test]
fn half_closed_connection_still_times_out_when_nothing_moves() {
    let backend = hold_backend();
    let lb = Lb::start(&[backend.addr], "idle_timeout = \"1s\"", "");
    let mut client = TcpStream::connect(lb.listen).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    client.write_all(b"hi").expect("write");
    client.shutdown(Shutdown::Write).expect("half-close");
    let half_closed = Instant::now();
    // The client's FIN is passed on at once...
    let (what, _) = backend
        .events
        .recv_timeout(Duration::from_secs(10))
        .expect("backend saw no EOF");
    assert_eq!(what, "eof");
    // ...and the remaining direction, idle, is closed by the timeout.
    let mut buf = [0u8; 16];
    let read = client.read(&mut buf);
    let closed_after = half_closed.elapsed();
    assert!(matches!(read, Ok(0)), "expected EOF, got {read:?}");
    assert!(
        closed_after >= Duration::from_millis(900),
        "closed after {closed_after:?}, before the idle timeout"
    );
    // The backend leg is gone as well: its writes start failing.
    backend.probe.store(true, Ordering::Relaxed);
    let (what, _) = backend
        .events
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend leg stayed open after the idle timeout");
    assert_eq!(what, "write failed");
    // srvlb's log reaches the test through a reader thread: wait for the line.
    lb.srvlb.wait_log("idle_timeout", Duration::from_secs(5));
    assert!(
        lb.events("connection closed")
            .iter()
            .any(|f| f["reason"] == "idle_timeout")
    );
    eprintln!("half-closed idle: closed {closed_after:?} after the half-close");
}
