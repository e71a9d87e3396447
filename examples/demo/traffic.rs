//! The demo's traffic: echo backends that greet with their name, clients that visit them
//! through srvlb (one exchange, in batches, or as a background load), and their tally.

use super::*;

/// A backend that greets each connection with its name and a newline, then echoes.
pub(super) struct EchoBackend {
    pub(super) name: String,
    pub(super) addr: SocketAddr,
    pub(super) accepted: Arc<AtomicU64>,
    pub(super) accept_task: Option<JoinHandle<()>>,
}

impl EchoBackend {
    pub(super) async fn start(name: &str) -> DemoResult<EchoBackend> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let greeting = format!("{name}\n");
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    // A client that vanishes mid-echo is not the backend's problem.
                    let _ = greet_and_echo(stream, greeting.as_bytes()).await;
                });
            }
        });
        Ok(EchoBackend {
            name: name.to_owned(),
            addr,
            accepted,
            accept_task: Some(accept_task),
        })
    }

    pub(super) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes the listening socket: new connections are refused from now on.
    pub(super) async fn kill(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
            // The listener is dropped (the port closed) once the aborted task is gone.
            let _ = task.await;
        }
    }
}

pub(super) async fn greet_and_echo(mut stream: TcpStream, greeting: &[u8]) -> std::io::Result<()> {
    stream.write_all(greeting).await?;
    let (mut read, mut write) = stream.split();
    tokio::io::copy(&mut read, &mut write).await?;
    write.shutdown().await
}

// ------------------------------------------------------------------------- clients

/// One client exchange through srvlb: connect (from `source` if given), read the backend's
/// greeting, send a line and check it comes back. Returns the backend's name.
pub(super) async fn visit(service: SocketAddr, source: Option<Ipv4Addr>) -> DemoResult<String> {
    tokio::time::timeout(VISIT_TIMEOUT, async {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::from((ip, 0)))?;
        }
        let stream = socket.connect(service).await?;
        let mut reader = BufReader::new(stream);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).await?;
        let name = greeting.trim_end().to_owned();
        if name.is_empty() {
            return Err::<String, DemoError>("connection closed before the greeting".into());
        }
        let message = b"hello through srvlb\n";
        reader.get_mut().write_all(message).await?;
        let mut echo = vec![0u8; message.len()];
        reader.read_exact(&mut echo).await?;
        if echo != message {
            return Err(format!("{name} echoed {:?}", String::from_utf8_lossy(&echo)).into());
        }
        Ok(name)
    })
    .await
    .map_err(|_| DemoError::from("timed out"))?
}

/// Results of a set of client exchanges.
#[derive(Default, Clone)]
pub(super) struct Tally {
    pub(super) by_backend: BTreeMap<String, u64>,
    /// Backend each client address landed on (the last one, if it connected several times).
    pub(super) by_source: HashMap<Ipv4Addr, String>,
    /// (source, backend) in completion order.
    pub(super) sequence: Vec<(Option<Ipv4Addr>, String)>,
    pub(super) failures: u64,
    pub(super) first_error: Option<String>,
}

impl Tally {
    pub(super) fn record(&mut self, source: Option<Ipv4Addr>, result: Result<String, String>) {
        match result {
            Ok(name) => {
                *self.by_backend.entry(name.clone()).or_default() += 1;
                if let Some(ip) = source {
                    self.by_source.insert(ip, name.clone());
                }
                self.sequence.push((source, name));
            }
            Err(e) => {
                self.failures += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    pub(super) fn count(&self, name: &str) -> u64 {
        self.by_backend.get(name).copied().unwrap_or(0)
    }

    pub(super) fn ok(&self) -> u64 {
        self.by_backend.values().sum()
    }

    pub(super) fn total(&self) -> u64 {
        self.ok() + self.failures
    }

    /// Adds another tally's counts (not its per-client detail).
    pub(super) fn add(&mut self, other: &Tally) {
        for (name, n) in &other.by_backend {
            *self.by_backend.entry(name.clone()).or_default() += n;
        }
        self.failures += other.failures;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// Runs one client exchange per entry of `sources`, at most `concurrency` at a time.
pub(super) async fn batch(
    service: SocketAddr,
    sources: &[Option<Ipv4Addr>],
    concurrency: usize,
) -> Tally {
    let mut tally = Tally::default();
    let mut running = JoinSet::new();
    for &source in sources {
        if running.len() >= concurrency.max(1) {
            join_one(&mut running, &mut tally).await;
        }
        running.spawn(async move {
            let result = visit(service, source).await.map_err(|e| e.to_string());
            (source, result)
        });
    }
    while !running.is_empty() {
        join_one(&mut running, &mut tally).await;
    }
    tally
}

pub(super) type VisitOutcome = (Option<Ipv4Addr>, Result<String, String>);

pub(super) async fn join_one(running: &mut JoinSet<VisitOutcome>, tally: &mut Tally) {
    match running.join_next().await {
        Some(Ok((source, result))) => tally.record(source, result),
        Some(Err(e)) => tally.record(None, Err(format!("client task failed: {e}"))),
        None => {}
    }
}

/// Clients that keep connecting to both services until stopped.
pub(super) struct Load {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) workers: JoinSet<Tally>,
}

impl Load {
    pub(super) fn start(p2c: SocketAddr, maglev: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = JoinSet::new();
        for worker in 0..4u8 {
            let stop = Arc::clone(&stop);
            workers.spawn(async move {
                let mut tally = Tally::default();
                let mut i = worker;
                while !stop.load(Ordering::Relaxed) {
                    let (service, source) = if worker % 2 == 0 {
                        (p2c, None)
                    } else {
                        (maglev, Some(client_ip(i % CLIENTS)))
                    };
                    let result = visit(service, source).await.map_err(|e| e.to_string());
                    tally.record(source, result);
                    i = i.wrapping_add(4);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tally
            });
        }
        Load { stop, workers }
    }

    pub(super) async fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        while let Some(joined) = self.workers.join_next().await {
            match joined {
                Ok(tally) => total.add(&tally),
                Err(e) => total.record(None, Err(format!("load worker failed: {e}"))),
            }
        }
        total
    }
}

/// (clients that were on `name`, of those how many moved, how many others moved).
pub(super) fn compare_mapping(
    before: &HashMap<Ipv4Addr, String>,
    after: &HashMap<Ipv4Addr, String>,
    name: &str,
) -> (usize, usize, usize) {
    let (mut on, mut moved_from, mut moved_others) = (0, 0, 0);
    for (ip, old) in before {
        let moved = after.get(ip).is_some_and(|new| new != old);
        if old == name {
            on += 1;
            moved_from += usize::from(moved);
        } else {
            moved_others += usize::from(moved);
        }
    }
    (on, moved_from, moved_others)
}
