//! The admin endpoint's HTTP: accept loops for its TCP and unix listeners, one hyper HTTP/1
//! connection per client, and the routes (`/metrics`, `/status`, `/healthz`) behind the
//! optional bearer token. hyper parses and answers malformed requests (400, or 431 over
//! 8 KiB); what it does not know about is kept here, because the endpoint must answer while
//! the rest of the process is under stress and no client may hold it: the head deadline from
//! accept, the whole-exchange deadline, the bounded slots (`slots.rs`) with eviction of the
//! oldest slow client, the spare descriptor, and a short drain after an error answer so the
//! close does not turn into a reset that destroys the answer in flight.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, warn};

use super::AdminState;
use super::metrics::{self, Format};
use super::slots::Slot;
use crate::log_throttle::LogThrottle;

/// From accept to the end of the request head. An operator's client sends its request at
/// once; a client that trickles it (a byte a second) is cut off here.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The whole exchange, from accept to close. A client that sends a request and never reads
/// the answer (or reads it a byte a minute) would otherwise hold a task and an fd for good.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head read; a longer one gets 431.
const MAX_HEAD: usize = 8192;

/// After an error answer, how long unread request bytes are drained before closing, so the
/// kernel does not turn the close into a reset that destroys the answer in flight.
const LINGER: Duration = Duration::from_millis(200);

static ADMIN_ACCEPT_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));

/// A listening socket of the admin endpoint.
pub(super) enum AdminListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl AdminListener {
    async fn accept(&self) -> std::io::Result<Connection> {
        Ok(match self {
            AdminListener::Tcp(l) => Connection::Tcp(l.accept().await?.0),
            AdminListener::Unix(l) => Connection::Unix(l.accept().await?.0),
        })
    }
}

enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Accepts admin connections until the task is aborted; each is served on a task of its own.
pub(super) async fn accept_loop(listener: AdminListener, state: Arc<AdminState>) {
    state.slots.refill_spare();
    loop {
        state.slots.room(state.slot_count()).await;
        let connection = match listener.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                accept_failed(&state, &e).await;
                continue;
            }
        };
        let (slot, evicted) = state.slots.admit(state.slot_count());
        if evicted {
            state.evictions.fetch_add(1, Ordering::Relaxed);
        }
        let task_state = Arc::clone(&state);
        tokio::spawn(async move {
            let state = task_state;
            let serve = async {
                match connection {
                    Connection::Tcp(s) => exchange(s, &slot, &state).await,
                    Connection::Unix(s) => exchange(s, &slot, &state).await,
                }
            };
            tokio::select! {
                result = tokio::time::timeout(RESPONSE_TIMEOUT, serve) => match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(error = %e, "admin request failed"),
                    Err(_) => debug!("admin client too slow; connection closed"),
                },
                () = slot.evict.notified() => debug!("admin connection evicted for a newer one"),
            }
            state.slots.release(slot.id);
        });
        state.slots.refill_spare();
    }
}

/// Out of descriptors: give up the spare so the next accept succeeds (an operator gets in
/// even then). Any other error, or none to give: back off a moment.
async fn accept_failed(state: &AdminState, e: &std::io::Error) {
    let exhausted = crate::os_error::out_of_descriptors(e);
    if exhausted && state.slots.use_spare() {
        if ADMIN_ACCEPT_LOG.allow() {
            warn!(error = %e, "admin accept: out of descriptors; using the spare");
        }
        return;
    }
    if ADMIN_ACCEPT_LOG.allow() {
        warn!(error = %e, "admin accept failed");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    state.slots.refill_spare();
}

/// One request and its answer on `stream`, then the close.
async fn exchange<S>(stream: S, slot: &Arc<Slot>, state: &Arc<AdminState>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Set when the answer is a 200; any other answer (hyper's 400 included) lingers.
    let answered_ok = Arc::new(AtomicBool::new(false));
    let service = {
        let (state, slot, ok) = (
            Arc::clone(state),
            Arc::clone(slot),
            Arc::clone(&answered_ok),
        );
        service_fn(
            move |request| -> Ready<Result<Response<Full<Bytes>>, Infallible>> {
                slot.answering.store(true, Ordering::Relaxed);
                let response = respond(&state, &request);
                ok.store(response.status() == StatusCode::OK, Ordering::Relaxed);
                ready(Ok(response))
            },
        )
    };
    let mut connection = http1::Builder::new()
        .keep_alive(false)
        .max_header_size(MAX_HEAD)
        .max_buf_size(2 * MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    let head_deadline = async {
        tokio::time::sleep(HEAD_TIMEOUT).await;
        if slot.answering.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        served = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => served,
        // Nothing to answer yet: the close tells the client.
        () = head_deadline => return Ok(()),
    };
    if let Err(e) = &served {
        if e.is_parse() || e.is_parse_too_large() {
            state.bad_requests.fetch_add(1, Ordering::Relaxed);
            debug!(error = %e, "malformed admin request");
        }
    }
    let mut stream = connection.into_parts().io.into_inner();
    stream.shutdown().await?;
    if served.is_err() || !answered_ok.load(Ordering::Relaxed) {
        linger(&mut stream).await;
    }
    Ok(())
}

/// The client may still be sending: read what it sends for a moment, so that the close is
/// a FIN and not a reset that could destroy the answer before it is read.
async fn linger<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Routes one request. A token, when configured, guards everything but `/healthz`, which
/// liveness probes call without credentials and which tells nothing.
fn respond(state: &Arc<AdminState>, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method();
    if !method.as_str().bytes().all(|b| b.is_ascii_uppercase()) {
        // hyper takes any token for a method; HTTP's are upper case, so this is no client
        // of ours (and probably not HTTP at all).
        state.bad_requests.fetch_add(1, Ordering::Relaxed);
        return text(
            StatusCode::BAD_REQUEST,
            "bad request: the method is not an upper-case token\n",
        );
    }
    let path = request.uri().path();
    if path != "/healthz" && !authorized(state, request) {
        state.unauthorized.fetch_add(1, Ordering::Relaxed);
        let mut response = text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"srvlb admin\""),
        );
        return response;
    }
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match path {
        "/metrics" => {
            let accept = request.headers().get(hyper::header::ACCEPT);
            let format = Format::from_accept(accept.and_then(|a| a.to_str().ok()));
            body(
                StatusCode::OK,
                format.content_type(),
                metrics::render(state, format),
            )
        }
        "/status" => body(
            StatusCode::OK,
            "application/json",
            super::status::render(state),
        ),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// True when no token is configured, or the request carries it as `Bearer <token>`.
fn authorized(state: &AdminState, request: &Request<Incoming>) -> bool {
    let token = state.token.load();
    let Some(token) = token.as_ref() else {
        return true;
    };
    let Some(header) = request.headers().get(AUTHORIZATION) else {
        return false;
    };
    let value = header.as_bytes();
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is compared as sent.
    match value.split_at_checked(7) {
        Some((scheme, presented)) if scheme.eq_ignore_ascii_case(b"bearer ") => {
            token.accepts(presented)
        }
        _ => false,
    }
}

fn text(status: StatusCode, message: &'static str) -> Response<Full<Bytes>> {
    body(status, "text/plain; charset=utf-8", message.to_owned())
}

fn body(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// Sends `request` to a served connection; the status line of the answer ("" when the
    /// connection closed without one).
    async fn status_of(request: &[u8]) -> String {
        let state = Arc::new(AdminState::default());
        let (slot, _) = state.slots.admit(4);
        let (mut client, server) = duplex(64 << 10);
        let serving = tokio::spawn({
            let state = Arc::clone(&state);
            async move { exchange(server, &slot, &state).await }
        });
        client.write_all(request).await.expect("send");
        let mut response = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut response));
        read.await
            .expect("answered or closed in time")
            .expect("read");
        let _ = serving.await;
        let text = String::from_utf8_lossy(&response).into_owned();
        text.lines().next().unwrap_or("").to_owned()
    }

    #[tokio::test]
    async fn valid_heads_with_crlf_or_bare_lf_are_answered() {
        for request in [
            &b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /healthz?x=1 HTTP/1.0\nHost: x\n\n",
            b"GET /healthz HTTP/1.1\n\n",
        ] {
            // hyper answers an HTTP/1.0 request in HTTP/1.0.
            let status = status_of(request).await;
            assert!(status.ends_with(" 200 OK"), "{request:?}: {status}");
        }
        assert!(
            status_of(b"POST /healthz HTTP/1.1\r\n\r\n")
                .await
                .contains("405")
        );
        assert!(
            status_of(b"GET /nope HTTP/1.1\r\n\r\n")
                .await
                .contains("404")
        );
    }

    #[tokio::test]
    async fn anything_else_is_answered_400_at_once() {
        for bad in [
            &b"\x16\x03\x01\x02\x00\r\n\r\n"[..], // a TLS ClientHello
            b"\x00\xff",
            b"get / HTTP/1.1\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET / FTP/1.0\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: \x00\r\n\r\n",
        ] {
            let status = status_of(bad).await;
            assert!(status.starts_with("HTTP/1.1 400"), "{bad:?}: {status:?}");
        }
    }

    #[tokio::test]
    async fn an_endless_head_is_431() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        while head.len() < 2 * MAX_HEAD {
            head.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let status = status_of(&head).await;
        assert!(status.starts_with("HTTP/1.1 431"), "{status:?}");
    }

    #[test]
    fn openmetrics_is_served_only_when_asked_for() {
        let om = "application/openmetrics-text;version=1.0.0,text/plain;q=0.5";
        assert_eq!(Format::from_accept(Some(om)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }
}
