//! Tests of the in-process DNS server in `tests/it/support/dns.rs`, through the same
//! hickory-resolver 0.26 client that discovery uses, plus raw UDP for the
//! truncation rules a resolver would hide.

use crate::support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use support::dns::{Failure, Srv, TestDns};
use tokio::net::UdpSocket;

/// A resolver that asks only `dns`, over UDP with TCP fallback, with no cache
/// (so every lookup reaches the server and sees the latest records), no retries
/// (so failure tests are quick and query counts exact) and no hosts file.
fn resolver(dns: &TestDns, timeout: Duration) -> TokioResolver {
    let addr = dns.addr();
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    let name_server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
    let config = ResolverConfig::from_name_servers(vec![name_server]);

    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.attempts = 0;
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .expect("resolver config is valid")
}

fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Srv {
    Srv {
        priority,
        weight,
        port,
        target: target.to_string(),
    }
}

/// (priority, weight, port, target, ttl) of every SRV answer, sorted.
fn srv_answers(lookup: &hickory_resolver::lookup::Lookup) -> Vec<(u16, u16, u16, String, u32)> {
    let mut out: Vec<_> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.to_ascii(), r.ttl)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// (owner, address) of every A/AAAA in the additional section, sorted.
fn additional_addrs(lookup: &hickory_resolver::lookup::Lookup) -> Vec<(String, IpAddr)> {
    let mut out: Vec<_> = lookup
        .additionals()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.to_ascii(), IpAddr::V4(a.0))),
            RData::AAAA(a) => Some((r.name.to_ascii(), IpAddr::V6(a.0))),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

const SVC: &str = "_http._tcp.svc.test.";
const TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn srv_lookup_returns_records_and_additionals() {
    let dns = TestDns::start().await.unwrap();
    dns.set_srv(
        SVC,
        30,
        &[srv(10, 60, 8080, "b1.test."), srv(20, 40, 8081, "b2.test")],
    );
    let v6: IpAddr = "::1".parse().unwrap();
    dns.set_addrs("b1.test.", 15, &[IpAddr::from([127, 0, 0, 2]), v6]);
    let resolver = resolver(&dns, TIMEOUT);

    let lookup = resolver.srv_lookup(SVC).await.unwrap();
    assert_eq!(
        srv_answers(&lookup),
        vec![
            (10, 60, 8080, "b1.test.".to_string(), 30),
            (20, 40, 8081, "b2.test.".to_string(), 30),
        ]
    );
    // b2 has no addresses, so only b1's show up.
    assert_eq!(
        additional_addrs(&lookup),
        vec![
            ("b1.test.".to_string(), IpAddr::from([127, 0, 0, 2])),
            ("b1.test.".to_string(), v6),
        ]
    );
    assert!(lookup.message().metadata.authoritative);
    assert_eq!(dns.queries(SVC), 1);
    // Case-insensitive and trailing dot optional.
    assert_eq!(dns.queries("_HTTP._tcp.svc.test"), 1);

    dns.set_additional(false);
    let lookup = resolver.srv_lookup(SVC).await.unwrap();
    assert_eq!(srv_answers(&lookup).len(), 2);
    assert!(additional_addrs(&lookup).is_empty());
    assert_eq!(dns.queries(SVC), 2);
}

#[tokio::test]
async fn a_and_aaaa_lookups_and_nodata() {
    let dns = TestDns::start().await.unwrap();
    let v4 = Ipv4Addr::new(10, 0, 0, 1);
    let v6: Ipv6Addr = "fd00::1".parse().unwrap();
    dns.set_addrs("b1.test", 42, &[v4.into(), v6.into()]);
    dns.set_addrs("v4only.test.", 42, &[v4.into()]);
    let resolver = resolver(&dns, TIMEOUT);

    let a = resolver.ipv4_lookup("b1.test.").await.unwrap();
    let got: Vec<_> = a
        .answers()
        .iter()
        .map(|r| (r.data.clone(), r.ttl))
        .collect();
    assert_eq!(got, vec![(RData::A(v4.into()), 42)]);

    let aaaa = resolver.ipv6_lookup("b1.test.").await.unwrap();
    let got: Vec<_> = aaaa
        .answers()
        .iter()
        .map(|r| (r.data.clone(), r.ttl))
        .collect();
    assert_eq!(got, vec![(RData::AAAA(v6.into()), 42)]);

    // The name exists without AAAA: NODATA (NOERROR, no answer), not NXDOMAIN.
    let err = resolver.ipv6_lookup("v4only.test.").await.unwrap_err();
    assert_eq!(classify(&err), Kind::NoData, "{err:?}");
    // And an SRV query for an address-only name is NODATA too.
    let err = resolver.srv_lookup("b1.test.").await.unwrap_err();
    assert_eq!(classify(&err), Kind::NoData, "{err:?}");

    // set_addrs replaces both families.
    dns.set_addrs("b1.test.", 5, &[v6.into()]);
    let err = resolver.ipv4_lookup("b1.test.").await.unwrap_err();
    assert_eq!(classify(&err), Kind::NoData, "{err:?}");
}

#[tokio::test]
async fn changes_are_seen_by_the_next_lookup() {
    let dns = TestDns::start().await.unwrap();
    let resolver = resolver(&dns, TIMEOUT);
    dns.set_srv(SVC, 300, &[srv(1, 1, 1000, "b1.test.")]);
    let first = resolver.srv_lookup(SVC).await.unwrap();
    assert_eq!(srv_answers(&first)[0].2, 1000);

    // A long TTL would keep the old answer in a caching resolver; ours has none.
    dns.set_srv(
        SVC,
        300,
        &[srv(1, 1, 2000, "b2.test."), srv(1, 1, 2001, "b3.test.")],
    );
    let second = resolver.srv_lookup(SVC).await.unwrap();
    let ports: Vec<u16> = srv_answers(&second).iter().map(|s| s.2).collect();
    assert_eq!(ports, vec![2000, 2001]);

    // An empty RRset keeps the name: NODATA.
    dns.set_srv(SVC, 300, &[]);
    let err = resolver.srv_lookup(SVC).await.unwrap_err();
    assert_eq!(classify(&err), Kind::NoData, "{err:?}");

    // "." is the RFC 2782 "service absent" target and comes through as the root.
    dns.set_srv(SVC, 300, &[srv(0, 0, 0, ".")]);
    let lookup = resolver.srv_lookup(SVC).await.unwrap();
    assert_eq!(srv_answers(&lookup), vec![(0, 0, 0, ".".to_string(), 300)]);
}

#[tokio::test]
async fn removed_and_unknown_names_are_nxdomain() {
    let dns = TestDns::start().await.unwrap();
    let resolver = resolver(&dns, TIMEOUT);

    let err = resolver.srv_lookup("_never._tcp.test.").await.unwrap_err();
    assert_eq!(classify(&err), Kind::NxDomain, "{err:?}");

    dns.set_srv(SVC, 30, &[srv(1, 1, 1000, "b1.test.")]);
    resolver.srv_lookup(SVC).await.unwrap();
    dns.remove(SVC);
    let err = resolver.srv_lookup(SVC).await.unwrap_err();
    assert_eq!(classify(&err), Kind::NxDomain, "{err:?}");
    // The SOA rides along, with the zero negative TTL.
    assert_eq!(err.into_soa().map(|soa| soa.ttl), Some(0));
    assert_eq!(dns.queries(SVC), 2);
}

#[tokio::test]
async fn failure_modes() {
    let dns = TestDns::start().await.unwrap();
    dns.set_srv(SVC, 30, &[srv(1, 1, 1000, "b1.test.")]);
    // Answers (even failing ones) get the usual timeout; only the dropped query waits for
    // a short one. (Server and resolver share this test's runtime: a stall of the test
    // must not turn an answer into a timeout.)
    let resolver_for_drops = resolver(&dns, Duration::from_millis(300));
    let resolver = resolver(&dns, TIMEOUT);

    dns.set_failure(Some(Failure::ServFail));
    let err = resolver.srv_lookup(SVC).await.unwrap_err();
    assert_eq!(classify(&err), Kind::ServFail, "{err:?}");

    dns.set_failure(Some(Failure::Refused));
    let err = resolver.srv_lookup(SVC).await.unwrap_err();
    assert_eq!(classify(&err), Kind::Refused, "{err:?}");

    dns.set_failure(Some(Failure::NxDomain));
    let err = resolver.srv_lookup(SVC).await.unwrap_err();
    assert_eq!(classify(&err), Kind::NxDomain, "{err:?}");

    let before = dns.queries(SVC);
    dns.set_failure(Some(Failure::Drop));
    let err = resolver_for_drops.srv_lookup(SVC).await.unwrap_err();
    assert_eq!(classify(&err), Kind::Timeout, "{err:?}");
    assert!(
        dns.queries(SVC) > before,
        "dropped queries are still counted"
    );

    dns.set_failure(None);
    assert_eq!(
        srv_answers(&resolver.srv_lookup(SVC).await.unwrap()).len(),
        1
    );
}

#[tokio::test]
async fn large_answer_falls_back_to_tcp() {
    let dns = TestDns::start().await.unwrap();
    let records: Vec<Srv> = (0..300)
        .map(|i| srv(1, 1, 10_000 + i, &format!("b{i}.test.")))
        .collect();
    dns.set_srv(SVC, 30, &records);
    for i in 0..300u16 {
        let [hi, lo] = i.to_be_bytes();
        dns.set_addrs(&format!("b{i}.test"), 30, &[IpAddr::from([10, 1, hi, lo])]);
    }
    let resolver = resolver(&dns, TIMEOUT);

    let lookup = resolver.srv_lookup(SVC).await.unwrap();
    let answers = srv_answers(&lookup);
    assert_eq!(answers.len(), 300);
    assert_eq!(additional_addrs(&lookup).len(), 300);
    // One truncated UDP query, then the same query over TCP.
    assert_eq!(dns.queries(SVC), 2);
}

/// Sends `query` over raw UDP (no resolver in between) and returns the wire
/// size and the parsed response.
async fn raw_udp(dns: &TestDns, query: &Message) -> (usize, Message) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(dns.addr()).await.unwrap();
    socket.send(&query.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let len = tokio::time::timeout(TIMEOUT, socket.recv(&mut buf))
        .await
        .expect("server answers")
        .unwrap();
    (len, Message::from_vec(&buf[..len]).unwrap())
}

#[tokio::test]
async fn udp_truncates_to_512_or_the_edns_size() {
    let dns = TestDns::start().await.unwrap();
    let records: Vec<Srv> = (0..100)
        .map(|i| srv(1, 1, 10_000 + i, &format!("b{i}.test.")))
        .collect();
    dns.set_srv(SVC, 30, &records);

    let mut query = Message::query();
    query.add_query(Query::query(
        Name::from_ascii(SVC).unwrap(),
        RecordType::SRV,
    ));

    // No EDNS: the RFC 1035 limit of 512 bytes.
    let (len, plain) = raw_udp(&dns, &query).await;
    assert!(len <= 512, "{len} bytes");
    assert!(plain.metadata.truncation);
    assert!(plain.metadata.authoritative);
    assert_eq!(plain.metadata.response_code, ResponseCode::NoError);
    assert!(plain.answers.len() < 100);

    // EDNS with 1232 bytes: more fits, still cut.
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    query.set_edns(edns);
    let (len, bigger) = raw_udp(&dns, &query).await;
    assert!(len > 512 && len <= 1232, "{len} bytes");
    assert!(bigger.metadata.truncation);
    assert!(bigger.answers.len() > plain.answers.len());

    // EDNS with room for everything: no truncation.
    let mut edns = Edns::new();
    edns.set_max_payload(65_000);
    query.set_edns(edns);
    let (_, full) = raw_udp(&dns, &query).await;
    assert!(!full.metadata.truncation);
    assert_eq!(full.answers.len(), 100);
}

#[tokio::test]
async fn shutdown_stops_answering() {
    let dns = TestDns::start().await.unwrap();
    dns.set_addrs("b1.test.", 30, &[IpAddr::from([127, 0, 0, 1])]);
    let resolver = resolver(&dns, TIMEOUT);
    resolver.ipv4_lookup("b1.test.").await.unwrap();

    let clone = dns.clone();
    clone.shutdown().await;
    let err = resolver.ipv4_lookup("b1.test.").await.unwrap_err();
    assert!(
        matches!(classify(&err), Kind::Timeout | Kind::Network),
        "{err:?}"
    );
    // Idempotent, also from the other handle.
    dns.shutdown().await;
}

/// How discovery has to tell lookup failures apart (DESIGN section 4): NXDOMAIN
/// and NODATA may empty a pool after the hold, everything else keeps it.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    NxDomain,
    NoData,
    ServFail,
    Refused,
    Timeout,
    Network,
    Other,
}

fn classify(err: &NetError) -> Kind {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(no)) => match no.response_code {
            ResponseCode::NXDomain => Kind::NxDomain,
            _ => Kind::NoData,
        },
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => Kind::ServFail,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => Kind::Refused,
        NetError::Timeout => Kind::Timeout,
        NetError::Io(_) | NetError::NoConnections => Kind::Network,
        _ => Kind::Other,
    }
}
