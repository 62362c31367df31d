//! The launcher's TCP rendezvous: rank 0 listens on every interface at a port of rookery's own
//! ([`port`]) and hands the same opaque bytes (NCCL's `ncclUniqueId`) to every other rank,
//! which connects to MASTER_ADDR at that port and reads them. Bounded by a deadline on both
//! sides, so a missing rank is an error, not a hang.
//!
//! Every interface, because MASTER_ADDR is the name the *other* ranks reach rank 0 by: on hosts
//! whose own name maps to 127.0.1.1 (Debian's /etc/hosts), binding it literally listens on
//! loopback only. A port of its own, because under torchrun MASTER_PORT is torchrun's store.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The rendezvous port: `ROOKERY_RDZV_PORT`, else MASTER_PORT + 1 (MASTER_PORT is the
/// launcher's; 29500 when unset, torchrun's default).
pub fn port(master_port: Option<u16>, rdzv_port: Option<&str>) -> Result<u16, String> {
    match rdzv_port {
        Some(p) => p
            .trim()
            .parse()
            .map_err(|_| format!("ROOKERY_RDZV_PORT={p:?} is not a port")),
        None => master_port
            .unwrap_or(29500)
            .checked_add(1)
            .ok_or_else(|| "MASTER_PORT is 65535: set ROOKERY_RDZV_PORT".to_string()),
    }
}

/// Rank 0: serves `payload` to `world - 1` peers on every interface at `addr`'s port, then
/// returns.
pub fn serve(addr: &str, world: usize, payload: &[u8], timeout: Duration) -> Result<(), String> {
    let port = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| format!("rendezvous: {addr} has no port"))?;
    let any = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    let listener = TcpListener::bind(any).map_err(|e| format!("rendezvous: binding {any}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("rendezvous: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut served = 0;
    while served + 1 < world {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                s.write_all(&(payload.len() as u32).to_le_bytes())
                    .and_then(|_| s.write_all(payload))
                    .map_err(|e| format!("rendezvous: sending to a peer: {e}"))?;
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(format!(
                        "rendezvous at {addr}: only {served} of {} other ranks connected within {:.0} s",
                        world - 1,
                        timeout.as_secs_f64()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("rendezvous: accepting at {addr}: {e}")),
        }
    }
    Ok(())
}

/// Any other rank: connects to rank 0 (retrying until it listens) and reads the payload.
pub fn fetch(addr: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let target = addr
        .to_socket_addrs()
        .map_err(|e| format!("rendezvous: resolving {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("rendezvous: {addr} resolves to nothing"))?;
    loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| e.to_string())?;
                let mut len = [0u8; 4];
                s.read_exact(&mut len)
                    .map_err(|e| format!("rendezvous: {e}"))?;
                let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
                s.read_exact(&mut buf)
                    .map_err(|e| format!("rendezvous: {e}"))?;
                return Ok(buf);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                return Err(format!(
                    "rendezvous: rank 0 at {addr} did not answer within {:.0} s: {e}",
                    timeout.as_secs_f64()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_rank_zeros_bytes() {
        let addr = "127.0.0.1:29731";
        let t = Duration::from_secs(10);
        let peers: Vec<_> = (0..3)
            .map(|_| std::thread::spawn(move || fetch(addr, t)))
            .collect();
        serve(addr, 4, b"unique-id", t).unwrap();
        for p in peers {
            assert_eq!(p.join().unwrap().unwrap(), b"unique-id");
        }
    }

    /// Rank 0 listens on every interface: a peer reaching it by another of its addresses
    /// (here 127.0.0.2; on a cluster, the address MASTER_ADDR resolves to elsewhere) connects.
    #[test]
    fn rank_zero_listens_on_every_interface() {
        let t = Duration::from_secs(10);
        let peer = std::thread::spawn(move || fetch("127.0.0.2:29734", t));
        serve("127.0.0.1:29734", 2, b"id", t).unwrap();
        assert_eq!(peer.join().unwrap().unwrap(), b"id");
    }

    #[test]
    fn the_port_is_rookerys_own() {
        assert_eq!(port(Some(29500), None), Ok(29501), "not torchrun's store");
        assert_eq!(port(None, None), Ok(29501));
        assert_eq!(port(Some(29500), Some("40000")), Ok(40000));
        assert!(port(Some(29500), Some("x")).is_err());
        assert!(port(Some(65535), None).is_err());
    }

    #[test]
    fn a_missing_peer_is_an_error() {
        let e = serve("127.0.0.1:29732", 2, b"x", Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("only 0 of 1"), "{e}");
        let e = fetch("127.0.0.1:29733", Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("did not answer"), "{e}");
    }
}
