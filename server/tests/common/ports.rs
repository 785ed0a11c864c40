//! Loopback ports for test nodes, picked outside the kernel's ephemeral range.
//!
//! A port handed out by binding `127.0.0.1:0` lies in the ephemeral range, where the kernel also
//! places every outgoing socket's local port: a test client's QUIC socket (bound to port 0) or a
//! peer's TCP connection can take a stopped node's port before the node restarts on it, and the
//! restart fails with "address already in use" (seen in CI). Ports below the ephemeral range are
//! only ever taken by an explicit bind, which is why nodes use them.
//! Shared by the server's and the client's integration tests (`#[path]`-included).

use std::sync::atomic::{AtomicU32, Ordering};

/// The next candidate offset in the range; each test process starts at its own place.
static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// The kernel's ephemeral range, `ip_local_port_range` (Linux's default when unreadable).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// The ports tests may use: below the ephemeral range if there is room, else above it.
fn usable_range() -> (u16, u16) {
    let (low, high) = ephemeral_range();
    if low >= 12_000 { (10_000, low - 1) } else { (high.saturating_add(1).max(1024), u16::MAX) }
}

/// A loopback port free for both TCP (peers) and UDP (QUIC clients), never returned twice by
/// this process.
pub fn free_port() -> u16 {
    let (first, last) = usable_range();
    let span = u32::from(last - first) + 1;
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let start = std::process::id().wrapping_mul(7919) % span;
        let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = first + offset as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no loopback port in {first}..={last} is free for both TCP and UDP");
}

#[test]
fn ports_are_outside_the_ephemeral_range_and_distinct() {
    let (low, high) = ephemeral_range();
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    for &port in &ports {
        assert!(!(low..=high).contains(&port), "port {port} is in the ephemeral range {low}-{high}");
    }
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "a port was handed out twice: {ports:?}");
}
