//! Selection costs: Maglev build (off the hot path, on every discovery change), and the
//! per-connection costs of lookup, the preference walk to a second choice, and P2C pick;
//! `select/*` measures a whole first pick as the proxy makes it (snapshot, tier rule,
//! algorithm, health predicate), so dispatch costs show up there.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use srvlb::balance::select::Selector;
use srvlb::balance::{MaglevTable, P2cTable, Selection, hash_key};
use srvlb::config::Balance;
use srvlb::pool::{Endpoint, Pool};

const SIZES: [usize; 3] = [10, 100, 1000];

fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("db{i}.example.:5432/10.0.{}.{}", i / 256, i % 256))
        .collect()
}

fn table(n: usize) -> MaglevTable {
    let names = names(n);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    MaglevTable::build(&refs, &vec![1; n], MaglevTable::DEFAULT_SIZE).expect("prime size")
}

/// A spread of client keys so lookups touch the whole table, as real traffic does.
fn keys() -> Vec<u64> {
    (0..1024u32)
        .map(|i| hash_key(&(0x0a00_0000 + i * 7919).to_be_bytes()))
        .collect()
}

fn maglev(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    for n in SIZES {
        let names = names(n);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let weights = vec![1; n];
        g.bench_with_input(BenchmarkId::new("build_65537", n), &n, |b, _| {
            b.iter(|| MaglevTable::build(black_box(&refs), &weights, MaglevTable::DEFAULT_SIZE))
        });
    }
    let keys = keys();
    for n in SIZES {
        let t = table(n);
        g.bench_with_input(BenchmarkId::new("lookup", n), &n, |b, _| {
            let mut k = keys.iter().cycle();
            b.iter(|| t.lookup(black_box(*k.next().unwrap_or(&0))))
        });
        g.bench_with_input(BenchmarkId::new("preference_2nd", n), &n, |b, _| {
            let mut k = keys.iter().cycle();
            b.iter(|| t.preference(black_box(*k.next().unwrap_or(&0))).nth(1))
        });
    }
    g.finish();
}

fn p2c(c: &mut Criterion) {
    let mut g = c.benchmark_group("p2c");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    for n in SIZES {
        let table = P2cTable::new(&(0..n as u32).map(|i| 1 + i % 5).collect::<Vec<_>>());
        let loads: Vec<u64> = (0..n as u64).map(|i| i * 37 % 101).collect();
        let mut rng = rand::rng();
        g.bench_with_input(BenchmarkId::new("pick", n), &n, |b, _| {
            b.iter(|| table.pick(&mut rng, |i| loads[i], |i| black_box(i) != 3))
        });
    }
    g.finish();
}

/// A pool of one tier of `n` backends.
fn pool(n: usize, balance: Balance) -> Pool {
    let pool = Pool::new("bench", Selection::new(balance));
    let endpoints: Vec<Endpoint> = (0..n)
        .map(|i| Endpoint {
            target: format!("db{i}.example."),
            port: 5432,
            addr: std::net::SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 5432)),
            priority: 10,
            weight: 1 + (i % 5) as u16,
        })
        .collect();
    pool.update(&endpoints).expect("pool");
    pool
}

fn select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    let keys = keys();
    let now = srvlb::health::now_ms();
    for (label, balance) in [("maglev", Balance::Maglev), ("p2c", Balance::P2c)] {
        for n in SIZES {
            let pool = pool(n, balance);
            let snapshot = pool.snapshot();
            let mut rng = rand::rng();
            g.bench_with_input(BenchmarkId::new(format!("{label}_first"), n), &n, |b, _| {
                let mut k = keys.iter().cycle();
                b.iter(|| {
                    let key = black_box(*k.next().unwrap_or(&0));
                    Selector::new(&snapshot.tiers, key, now).next_backend(&mut rng)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, maglev, p2c, select);
criterion_main!(benches);
