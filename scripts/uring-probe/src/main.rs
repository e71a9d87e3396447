//! A measurement probe, not part of srvlb: the smallest TCP proxy on io_uring, to bound what
//! an io_uring data path (the performance issue's lever 5) could save against srvlb's epoll
//! path. Two threads, each with its own ring and its own SO_REUSEPORT listeners; per
//! connection a 16 KiB buffer each way, recv -> send -> recv, a FIN passed on with
//! shutdown(SHUT_WR); one io_uring_enter per loop. No idle timeout, counters, health, PROXY
//! protocol, limits or reload: it is the floor such a design can reach, not a proxy to run.
//!
//! It reads the listen/static pairs of scripts/bench-compare's srvlb.toml, so the harness
//! runs it as its "srvlb-base" column:
//!
//!   (cd scripts/uring-probe && cargo build --release)
//!   ROUNDS=3 DURATION=5 TESTS=wrk LBS="srvlb srvlb-base haproxy nginx" \
//!     SRVLB_BASE_BIN=scripts/uring-probe/target/release/uring-probe scripts/bench-compare
//!
//! Results are in BENCHMARKS.md ("io_uring, measured with a probe").
use io_uring::{IoUring, opcode, types};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{IntoRawFd, RawFd};

const BUF: usize = 16 * 1024;
const ACCEPT: u64 = 0;
const CONNECT: u64 = 1;
const RECV: u64 = 2; // + dir
const SEND: u64 = 4; // + dir

struct Conn {
    fds: [RawFd; 2], // 0 client, 1 backend
    bufs: [Box<[u8; BUF]>; 2],
    len: [usize; 2],
    off: [usize; 2],
    addr: Box<libc::sockaddr_in>,
    inflight: u32,
    done: [bool; 2],
    closing: bool,
}

fn ud(id: usize, op: u64) -> u64 {
    ((id as u64) << 8) | op
}

struct Worker {
    ring: IoUring,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    listeners: Vec<(RawFd, SocketAddr)>,
}

impl Worker {
    fn push(&mut self, e: io_uring::squeue::Entry) {
        // SAFETY: every buffer and address an entry points at lives in a boxed Conn that is
        // freed only once its in-flight count is back to zero.
        unsafe {
            while self.ring.submission().push(&e).is_err() {
                self.ring.submit().expect("submit");
            }
        }
    }
    fn arm_accept(&mut self, i: usize) {
        let e = opcode::Accept::new(
            types::Fd(self.listeners[i].0),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ud(i, ACCEPT));
        self.push(e);
    }
    fn recv(&mut self, id: usize, d: usize) {
        let c = self.conns[id].as_mut().expect("a live connection");
        c.inflight += 1;
        let e = opcode::Recv::new(types::Fd(c.fds[d]), c.bufs[d].as_mut_ptr(), BUF as u32)
            .build()
            .user_data(ud(id, RECV + d as u64));
        self.push(e);
    }
    fn send(&mut self, id: usize, d: usize) {
        let c = self.conns[id].as_mut().expect("a live connection");
        c.inflight += 1;
        let (off, len) = (c.off[d], c.len[d]);
        let e = opcode::Send::new(
            types::Fd(c.fds[1 - d]),
            c.bufs[d][off..].as_ptr(),
            (len - off) as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud(id, SEND + d as u64));
        self.push(e);
    }
    fn close(&mut self, id: usize) {
        let c = self.conns[id].as_mut().expect("a live connection");
        if !c.closing {
            c.closing = true;
            for fd in c.fds {
                // SAFETY: plain syscall on descriptors this connection owns.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        self.maybe_free(id);
    }
    fn maybe_free(&mut self, id: usize) {
        let c = self.conns[id].as_ref().expect("a live connection");
        if c.closing && c.inflight == 0 {
            for fd in c.fds {
                // SAFETY: no operation refers to the descriptor any more.
                unsafe { libc::close(fd) };
            }
            self.conns[id] = None;
            self.free.push(id);
        }
    }
    fn on_accept(&mut self, i: usize, res: i32) {
        self.arm_accept(i);
        if res < 0 {
            return;
        }
        let backend = self.listeners[i].1;
        // SAFETY: plain syscall.
        let bfd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        let SocketAddr::V4(v4) = backend else {
            panic!("the probe speaks IPv4 only")
        };
        let addr = Box::new(libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        });
        let conn = Box::new(Conn {
            fds: [res, bfd],
            bufs: [Box::new([0; BUF]), Box::new([0; BUF])],
            len: [0; 2],
            off: [0; 2],
            addr,
            inflight: 1,
            done: [false; 2],
            closing: false,
        });
        let id = match self.free.pop() {
            Some(id) => {
                self.conns[id] = Some(conn);
                id
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        let c = self.conns[id].as_ref().expect("a live connection");
        let e = opcode::Connect::new(
            types::Fd(bfd),
            &*c.addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
        .build()
        .user_data(ud(id, CONNECT));
        self.push(e);
    }
    fn on_cqe(&mut self, user_data: u64, res: i32) {
        let (id, op) = ((user_data >> 8) as usize, user_data & 0xff);
        if op == ACCEPT {
            return self.on_accept(id, res);
        }
        let c = self.conns[id].as_mut().expect("a live connection");
        c.inflight -= 1;
        if c.closing {
            return self.maybe_free(id);
        }
        match op {
            CONNECT => {
                if res < 0 {
                    return self.close(id);
                }
                let one: libc::c_int = 1;
                for fd in c.fds {
                    // SAFETY: plain syscall with a valid option buffer.
                    unsafe {
                        libc::setsockopt(
                            fd,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            &one as *const _ as *const libc::c_void,
                            4,
                        )
                    };
                }
                self.recv(id, 0);
                self.recv(id, 1);
            }
            2 | 3 => {
                let d = (op - RECV) as usize;
                if res < 0 {
                    return self.close(id);
                }
                if res == 0 {
                    c.done[d] = true;
                    // SAFETY: plain syscall.
                    unsafe { libc::shutdown(c.fds[1 - d], libc::SHUT_WR) };
                    if c.done[0] && c.done[1] {
                        self.close(id);
                    }
                    return;
                }
                c.len[d] = res as usize;
                c.off[d] = 0;
                self.send(id, d);
            }
            _ => {
                let d = (op - SEND) as usize;
                if res < 0 {
                    return self.close(id);
                }
                c.off[d] += res as usize;
                if c.off[d] < c.len[d] {
                    self.send(id, d);
                } else {
                    self.recv(id, d);
                }
            }
        }
    }
    fn run(mut self) {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        let mut done = Vec::with_capacity(256);
        loop {
            self.ring.submit_and_wait(1).expect("submit_and_wait");
            done.clear();
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(u, r) in &done {
                self.on_cqe(u, r);
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| args[i + 1].clone())
        .expect("--config");
    let text = std::fs::read_to_string(path).expect("config");
    let (mut pairs, mut listen) = (Vec::new(), None);
    for line in text.lines() {
        let val = || {
            line.split('"')
                .nth(1)
                .and_then(|v| v.parse::<SocketAddr>().ok())
                .expect("listen/static lines hold one quoted address")
        };
        if line.starts_with("listen") {
            listen = Some(val());
        } else if line.starts_with("static") {
            pairs.push((
                listen.take().expect("a listen line before each static"),
                val(),
            ));
        }
    }
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let pairs = pairs.clone();
            std::thread::spawn(move || {
                let listeners = pairs
                    .iter()
                    .map(|(l, b)| {
                        let s = socket2::Socket::new(
                            socket2::Domain::IPV4,
                            socket2::Type::STREAM,
                            None,
                        )
                        .expect("socket");
                        s.set_reuse_port(true).expect("SO_REUSEPORT");
                        s.set_reuse_address(true).expect("SO_REUSEADDR");
                        s.bind(&(*l).into()).expect("bind the listen address");
                        s.listen(1024).expect("listen");
                        let l: TcpListener = s.into();
                        (l.into_raw_fd(), *b)
                    })
                    .collect();
                Worker {
                    ring: IoUring::new(4096).expect("io_uring"),
                    conns: Vec::new(),
                    free: Vec::new(),
                    listeners,
                }
                .run()
            })
        })
        .collect();
    eprintln!("uring-probe: {} listeners, 2 threads", pairs.len());
    for t in threads {
        let _ = t.join();
    }
}
