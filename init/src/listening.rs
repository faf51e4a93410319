//! What listens on the network, as the kernel lists it (`/proc/net/{tcp,tcp6,udp,udp6}`), with
//! the program that owns each socket (from `/proc/<pid>/fd`). The `ready` line says it, so an
//! operator sees at a glance that nothing but what was asked for (SSH with a key, the Engine
//! API with TLS, a container's published port) is reachable from outside.

use crate::sys::Paths;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One listening socket.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub proto: &'static str,
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
}

impl Listener {
    pub fn loopback(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => a.is_loopback(),
            IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|m| m.is_loopback()),
        }
    }
}

/// `0100007F:0016` (little-endian words, as the kernel prints them) -> address and port.
fn parse_endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<u32>> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let words = words?;
    let ip = match (addr.len(), words.as_slice()) {
        (8, [w]) => IpAddr::V4(Ipv4Addr::from(w.to_le_bytes())),
        (32, [a, b, c, d]) => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// The listening sockets of one `/proc/net/<proto>` table: TCP in LISTEN, UDP unconnected.
pub fn parse_table(proto: &'static str, text: &str) -> Vec<Listener> {
    let udp = proto.starts_with("udp");
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (f.get(1)?, f.get(2)?, f.get(3)?);
            let (addr, port) = parse_endpoint(local)?;
            let listening = if udp {
                parse_endpoint(remote).is_some_and(|(_, p)| p == 0)
            } else {
                *state == "0A"
            };
            listening.then(|| Listener {
                proto,
                addr,
                port,
                inode: f.get(9).and_then(|i| i.parse().ok()).unwrap_or(0),
            })
        })
        .collect()
}

/// Socket inode -> the name of a program that holds it.
fn owners(paths: &Paths) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir(paths.p("/proc")) else {
        return out;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let link = std::fs::read_link(fd.path()).unwrap_or_default();
            let link = link.to_string_lossy();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|i| i.parse().ok())
            {
                out.entry(inode).or_insert_with(|| comm.trim().to_string());
            }
        }
    }
    out
}

/// Every listening socket, sorted.
pub fn listeners(paths: &Paths) -> Vec<Listener> {
    let mut all = Vec::new();
    for proto in ["tcp", "tcp6", "udp", "udp6"] {
        if let Ok(text) = std::fs::read_to_string(paths.p("/proc/net").join(proto)) {
            all.extend(parse_table(proto, &text));
        }
    }
    all.sort();
    all.dedup();
    all
}

/// For the `ready` line: what listens beyond loopback, with its program.
pub fn summary(paths: &Paths) -> String {
    let outside: Vec<Listener> = listeners(paths)
        .into_iter()
        .filter(|l| !l.loopback())
        .collect();
    if outside.is_empty() {
        return "nothing beyond loopback".into();
    }
    let owners = owners(paths);
    outside
        .iter()
        .map(|l| {
            let who = owners
                .get(&l.inode)
                .map(|o| format!(" ({o})"))
                .unwrap_or_default();
            let addr = match l.addr {
                IpAddr::V6(a) => format!("[{a}]"),
                a => a.to_string(),
            };
            format!("{} {addr}:{}{who}", l.proto.trim_end_matches('6'), l.port)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0143 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 102 1 0000000000000000 100 0 0 10 0
   2: 0F02000A:0016 0202000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 103 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0143 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 104 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:0948 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 105 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  10: 0100007F:0143 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 106 2 0000000000000000 0
  11: 0F02000A:A1B2 0202000A:007B 01 00000000:00000000 00:00000000 00000000   100        0 107 2 0000000000000000 0
";

    #[test]
    fn the_kernels_tables_read_as_listeners() {
        let t = parse_table("tcp", TCP);
        assert_eq!(t.len(), 2, "an established connection is not listening");
        assert_eq!(t[0].addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!((t[0].port, t[0].loopback()), (323, true));
        assert_eq!((t[1].port, t[1].loopback(), t[1].inode), (22, false, 102));
        let t6 = parse_table("tcp6", TCP6);
        assert!(t6[0].loopback() && t6[0].port == 323);
        assert_eq!(
            (t6[1].addr, t6[1].port),
            (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 2376)
        );
        let u = parse_table("udp", UDP);
        assert_eq!(u.len(), 1, "a connected client socket is not listening");
        assert!(u[0].loopback());
    }

    #[test]
    fn the_summary_names_only_what_is_reachable_from_outside() {
        let root = std::env::temp_dir().join(format!("spotinit-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let paths = Paths::under(&root);
        std::fs::create_dir_all(root.join("proc/net")).unwrap();
        std::fs::write(root.join("proc/net/udp"), UDP).unwrap();
        assert_eq!(summary(&paths), "nothing beyond loopback");
        std::fs::write(root.join("proc/net/tcp"), TCP).unwrap();
        std::fs::write(root.join("proc/net/tcp6"), TCP6).unwrap();
        std::fs::create_dir_all(root.join("proc/77/fd")).unwrap();
        std::fs::write(root.join("proc/77/comm"), "dropbear\n").unwrap();
        std::os::unix::fs::symlink("socket:[102]", root.join("proc/77/fd/3")).unwrap();
        assert_eq!(summary(&paths), "tcp 0.0.0.0:22 (dropbear), tcp [::]:2376");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
