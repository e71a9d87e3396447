//! In-process authoritative DNS server for integration tests and the demo.
//!
//! [`TestDns`] serves SRV, A and AAAA records out of a map that the test changes
//! while the server runs, so discovery code can be exercised against real UDP and
//! TCP sockets on 127.0.0.1 without a system resolver or a bind9 install.
//!
//! What it does, and why:
//! - Every answer is authoritative (AA bit): srvlb treats the server as the source
//!   of truth, and a resolver must not mistake it for a forwarder.
//! - A name that exists but lacks the asked type gets NOERROR with an empty answer
//!   (NODATA); a name never set, or removed, gets NXDOMAIN. Both carry a synthetic
//!   SOA with TTL 0 in the authority section so resolvers can tell the two apart
//!   and do not cache the negative answer.
//! - SRV answers carry the targets' A/AAAA records in the additional section
//!   (switchable), because srvlb uses them when present.
//! - UDP answers are cut to 512 bytes, or to the client's advertised EDNS payload
//!   size, with the TC bit set, so a real client has to retry over TCP; the TCP
//!   listener shares the UDP port for that reason. The truncation itself is done
//!   by hickory-server's encoder; this module only makes sure the response carries
//!   the client's payload size (see [`Handler::respond`]).
//! - [`Failure`] turns the whole server into a failing one (SERVFAIL, REFUSED,
//!   silence, NXDOMAIN) to test that discovery keeps its last good set, or only
//!   the queries for one name ([`TestDns::set_name_failure`]), e.g. an SRV target
//!   whose A record is not ready.
//! - [`TestDns::set_delay`] holds every answer back for a while: a slow server.
//!
//! Included both as `tests/it/support/dns.rs` and via `#[path]` from the demo, so it
//! depends on crates only, never on sibling support modules.

// Each user only calls part of the API; the rest must not warn.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use parking_lot::Mutex;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// TTL (and SOA minimum) of negative answers. Zero so that a resolver never
/// caches "does not exist" across a test that creates the name a moment later.
const NEGATIVE_TTL: u32 = 0;

/// A TCP connection that sends nothing for this long is closed by the server.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Outgoing-response queue length per TCP connection (hickory-server parameter).
const TCP_RESPONSE_BUFFER: usize = 64;

/// How often to pick a new port when TCP cannot bind the port UDP got.
const BIND_ATTEMPTS: usize = 20;

/// One SRV record as a test writes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// Absolute target name such as `"b1.test."`; `"."` means "service absent".
    /// The trailing dot is optional.
    pub target: String,
}

/// Global failure mode, see [`TestDns::set_failure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// Every query is answered with SERVFAIL.
    ServFail,
    /// Every query is answered with REFUSED.
    Refused,
    /// Queries are read (and counted) but never answered: the client times out.
    Drop,
    /// Every name is answered with NXDOMAIN, whatever the zone holds.
    NxDomain,
}

/// Handle on a running server. Clones share the server; it stops when the last
/// clone is dropped or on [`TestDns::shutdown`].
#[derive(Clone)]
pub struct TestDns {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Firing (or dropping) this makes the supervisor task stop the server.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// The supervisor task; awaited by `shutdown` so the sockets are closed
    /// when it returns.
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Everything the handler reads; the test task writes it through `TestDns`.
struct State {
    nodes: HashMap<LowerName, Node>,
    failure: Option<Failure>,
    /// Failure modes of single names; the global one wins.
    name_failures: HashMap<LowerName, Failure>,
    /// How long each answer is held back.
    delay: Duration,
    additional: bool,
    queries: HashMap<LowerName, usize>,
}

/// The records of one owner name. A node with every set empty still exists,
/// which is what makes NODATA differ from NXDOMAIN.
#[derive(Default)]
struct Node {
    srv: Option<(u32, Vec<SRV>)>,
    a: Option<(u32, Vec<Ipv4Addr>)>,
    aaaa: Option<(u32, Vec<Ipv6Addr>)>,
}

impl TestDns {
    /// Starts a server on 127.0.0.1, UDP and TCP on the same (ephemeral) port.
    pub async fn start() -> io::Result<TestDns> {
        let (udp, tcp) = bind_pair().await?;
        let addr = udp.local_addr()?;

        let state = Arc::new(Mutex::new(State {
            nodes: HashMap::new(),
            failure: None,
            name_failures: HashMap::new(),
            delay: Duration::ZERO,
            additional: true,
            queries: HashMap::new(),
        }));

        let mut server = Server::new(Handler {
            state: Arc::clone(&state),
        });
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);

        // The supervisor owns the server so that stopping it needs no async
        // context: dropping the sender (last handle dropped) is enough.
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = stop_rx.await;
            let _ = server.shutdown_gracefully().await;
        });

        Ok(TestDns {
            inner: Arc::new(Inner {
                addr,
                state,
                stop: Mutex::new(Some(stop_tx)),
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// Address of both the UDP socket and the TCP listener.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Replaces the SRV RRset of `name`. An empty `records` keeps the name in
    /// existence with no SRV (a NODATA answer).
    pub fn set_srv(&self, name: &str, ttl: u32, records: &[Srv]) {
        let rdata = records
            .iter()
            .map(|r| SRV::new(r.priority, r.weight, r.port, parse_name(&r.target)))
            .collect();
        let mut state = self.inner.state.lock();
        state.nodes.entry(lower(name)).or_default().srv = Some((ttl, rdata));
    }

    /// Replaces both the A and the AAAA RRset of `host` with `addrs`.
    pub fn set_addrs(&self, host: &str, ttl: u32, addrs: &[IpAddr]) {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for addr in addrs {
            match addr {
                IpAddr::V4(a) => v4.push(*a),
                IpAddr::V6(a) => v6.push(*a),
            }
        }
        let mut state = self.inner.state.lock();
        let node = state.nodes.entry(lower(host)).or_default();
        node.a = Some((ttl, v4));
        node.aaaa = Some((ttl, v6));
    }

    /// Deletes every record of `name`: later queries get NXDOMAIN.
    pub fn remove(&self, name: &str) {
        self.inner.state.lock().nodes.remove(&lower(name));
    }

    /// Sets (or with `None` clears) the global failure mode.
    pub fn set_failure(&self, failure: Option<Failure>) {
        self.inner.state.lock().failure = failure;
    }

    /// Sets (or with `None` clears) the failure mode of queries for `name` only. A failing
    /// name is also left out of additional sections, as a server that cannot answer for it
    /// would.
    pub fn set_name_failure(&self, name: &str, failure: Option<Failure>) {
        let mut state = self.inner.state.lock();
        match failure {
            Some(f) => state.name_failures.insert(lower(name), f),
            None => state.name_failures.remove(&lower(name)),
        };
    }

    /// Holds every answer back for `delay` (zero: answer at once).
    pub fn set_delay(&self, delay: Duration) {
        self.inner.state.lock().delay = delay;
    }

    /// Whether SRV answers carry their targets' A/AAAA in the additional
    /// section (default on). Off mimics servers that omit them.
    pub fn set_additional(&self, on: bool) {
        self.inner.state.lock().additional = on;
    }

    /// Number of queries received for `name`, any type, any transport, in any
    /// failure mode (including unanswered ones). A UDP query retried over TCP
    /// after truncation counts twice.
    pub fn queries(&self, name: &str) -> usize {
        let state = self.inner.state.lock();
        state.queries.get(&lower(name)).copied().unwrap_or(0)
    }

    /// Stops the server and waits until its sockets are closed, so that a test
    /// can rely on "DNS server down" right after this returns. Later calls, and
    /// calls on other clones, return at once.
    pub async fn shutdown(&self) {
        if let Some(stop) = self.inner.stop.lock().take() {
            let _ = stop.send(());
        }
        let task = self.inner.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Binds UDP on an ephemeral port, then TCP on the same port. Another process
/// may hold that TCP port, so on `AddrInUse` start over with a fresh UDP port.
async fn bind_pair() -> io::Result<(UdpSocket, TcpListener)> {
    let any_port = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut last_err = None;
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind(any_port).await?;
        let addr = udp.local_addr()?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("could not bind UDP and TCP on one port")))
}

/// Parses an absolute name; the trailing dot is optional. Test input, so a bad
/// name is a bug in the test and panics with the name.
fn parse_name(name: &str) -> Name {
    let mut parsed =
        Name::from_ascii(name).unwrap_or_else(|e| panic!("invalid DNS name {name:?}: {e}"));
    parsed.set_fqdn(true);
    parsed
}

/// Case-insensitive map key for a name.
fn lower(name: &str) -> LowerName {
    LowerName::new(&parse_name(name))
}

/// What to send for one request, computed under the lock and sent after it is
/// released (the send awaits).
struct Reply {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    soa: Vec<Record>,
    additionals: Vec<Record>,
}

impl Reply {
    fn error(code: ResponseCode) -> Self {
        Reply {
            code,
            authoritative: false,
            answers: Vec::new(),
            soa: Vec::new(),
            additionals: Vec::new(),
        }
    }

    /// NXDOMAIN or NODATA: authoritative, with the SOA that bounds negative caching.
    fn negative(code: ResponseCode) -> Self {
        let soa = SOA::new(
            parse_name("ns.test."),
            parse_name("hostmaster.test."),
            1,
            3600,
            600,
            86400,
            NEGATIVE_TTL,
        );
        Reply {
            code,
            authoritative: true,
            answers: Vec::new(),
            // Owned by the root, which is an ancestor of every query name, so
            // the SOA is acceptable for whatever was asked.
            soa: vec![Record::from_rdata(
                Name::root(),
                NEGATIVE_TTL,
                RData::SOA(soa),
            )],
            additionals: Vec::new(),
        }
    }
}

struct Handler {
    state: Arc<Mutex<State>>,
}

impl Handler {
    /// Decides the reply; `None` means stay silent (`Failure::Drop`).
    fn reply(&self, request: &Request) -> Option<Reply> {
        if request.metadata.op_code != OpCode::Query {
            return Some(Reply::error(ResponseCode::NotImp));
        }
        let Ok(info) = request.request_info() else {
            // Zero or several questions: nothing sensible to answer.
            return Some(Reply::error(ResponseCode::FormErr));
        };
        let query = info.query;
        let qname = query.name().clone();

        let mut state = self.state.lock();
        *state.queries.entry(qname.clone()).or_default() += 1;

        match state
            .failure
            .or_else(|| state.name_failures.get(&qname).copied())
        {
            Some(Failure::Drop) => return None,
            Some(Failure::ServFail) => return Some(Reply::error(ResponseCode::ServFail)),
            Some(Failure::Refused) => return Some(Reply::error(ResponseCode::Refused)),
            Some(Failure::NxDomain) => return Some(Reply::negative(ResponseCode::NXDomain)),
            None => {}
        }
        if query.query_class() != DNSClass::IN {
            return Some(Reply::error(ResponseCode::Refused));
        }
        let Some(node) = state.nodes.get(&qname) else {
            return Some(Reply::negative(ResponseCode::NXDomain));
        };

        // Answers use the name exactly as asked: a client using 0x20 case
        // randomisation checks that the case came back unchanged.
        let owner = query.original().name().clone();
        let qtype = query.query_type();
        let any = qtype == RecordType::ANY;
        let mut answers = Vec::new();
        if any || qtype == RecordType::SRV {
            push_srv(&mut answers, &owner, node);
        }
        if any || qtype == RecordType::A {
            push_a(&mut answers, &owner, node);
        }
        if any || qtype == RecordType::AAAA {
            push_aaaa(&mut answers, &owner, node);
        }
        if answers.is_empty() {
            return Some(Reply::negative(ResponseCode::NoError));
        }

        let mut additionals = Vec::new();
        if state.additional && qtype == RecordType::SRV {
            // Each target once, even when several SRV records share it.
            let mut seen = Vec::new();
            for srv in node.srv.iter().flat_map(|(_, set)| set) {
                if srv.target.is_root()
                    || seen.contains(&&srv.target)
                    || state
                        .name_failures
                        .contains_key(&LowerName::new(&srv.target))
                {
                    continue;
                }
                seen.push(&srv.target);
                if let Some(target) = state.nodes.get(&LowerName::new(&srv.target)) {
                    push_a(&mut additionals, &srv.target, target);
                    push_aaaa(&mut additionals, &srv.target, target);
                }
            }
        }

        Some(Reply {
            code: ResponseCode::NoError,
            authoritative: true,
            answers,
            soa: Vec::new(),
            additionals,
        })
    }

    /// Encodes and sends `reply`. Truncation of UDP answers happens inside
    /// hickory-server's encoder: it limits a UDP message to 512 bytes when the
    /// response has no EDNS, and to the response EDNS's payload size when it
    /// has one. So the response echoes EDNS only when the query had it, with
    /// the client's own advertised size (never below the 512 every client takes).
    async fn respond<R: ResponseHandler>(
        request: &Request,
        reply: Reply,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = reply.authoritative;
        metadata.response_code = reply.code;

        let response_edns = request.edns.as_ref().map(|req| {
            let mut edns = Edns::new();
            edns.set_max_payload(req.max_payload().max(512));
            edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &response_edns {
            builder.edns(edns);
        }
        let response = builder.build(
            metadata,
            &reply.answers,
            std::iter::empty(),
            &reply.soa,
            &reply.additionals,
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            // The client is gone; nothing to report beyond what we meant to send.
            Err(_) => header_only(metadata),
        }
    }
}

fn header_only(metadata: Metadata) -> ResponseInfo {
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

fn push_srv(out: &mut Vec<Record>, owner: &Name, node: &Node) {
    if let Some((ttl, set)) = &node.srv {
        out.extend(
            set.iter()
                .map(|srv| Record::from_rdata(owner.clone(), *ttl, RData::SRV(srv.clone()))),
        );
    }
}

fn push_a(out: &mut Vec<Record>, owner: &Name, node: &Node) {
    if let Some((ttl, set)) = &node.a {
        out.extend(
            set.iter()
                .map(|ip| Record::from_rdata(owner.clone(), *ttl, RData::A(A::from(*ip)))),
        );
    }
}

fn push_aaaa(out: &mut Vec<Record>, owner: &Name, node: &Node) {
    if let Some((ttl, set)) = &node.aaaa {
        out.extend(
            set.iter()
                .map(|ip| Record::from_rdata(owner.clone(), *ttl, RData::AAAA(AAAA::from(*ip)))),
        );
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let reply = self.reply(request);
        let delay = self.state.lock().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match reply {
            Some(reply) => Self::respond(request, reply, response_handle).await,
            // Failure::Drop: the client must see silence, not an error.
            None => header_only(Metadata::response_from_request(&request.metadata)),
        }
    }
}
