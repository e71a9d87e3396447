//! Test backends: `TestBackend` (says who it is, in several modes of misbehaviour),
//! `ManyEcho` (an echo server on its own runtime for thousands of connections) and
//! `BlackHole` (a listener whose connects time out).

use super::*;

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
