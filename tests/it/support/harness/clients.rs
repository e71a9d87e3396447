//! Client helpers: who answers, bounded waits, HTTP GETs of the admin endpoint, metric values.

use super::*;

/// Connects through srvlb and returns the name of the backend that answered.
pub fn who_answers(addr: SocketAddr) -> std::io::Result<String> {
    who_answers_from(addr, None)
}

/// Like `who_answers`, binding the client socket to `source` (e.g. 127.0.0.7:0).
pub fn who_answers_from(addr: SocketAddr, source: Option<SocketAddr>) -> std::io::Result<String> {
    let stream = match source {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5))?,
        Some(src) => {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&src.into())?;
            socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
            socket.into()
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a greeting",
        ));
    }
    Ok(line.trim_end().to_owned())
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// GETs `path` from the admin endpoint at `addr` and returns the response body. Panics on
/// any failure (a test helper); bounded by 10 s timeouts.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed HTTP response: {response:?}"));
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "GET {path} failed: {head}"
    );
    body.to_owned()
}

/// GETs `path` from the admin endpoint, timing it from connect to the end of the response:
/// `(elapsed, status line, body)`. Errors instead of panicking (for tests that measure).
pub fn timed_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(Duration, String, String)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_owned();
    Ok((elapsed, status, body.to_owned()))
}

/// The value of the first /metrics line that starts with `prefix` (name and labels).
pub fn metric_value(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
