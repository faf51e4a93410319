//! The clock. SigV4-signed EC2 calls fail when the clock is more than 5 minutes off, so the
//! boot starts chronyd against the Amazon Time Sync Service (169.254.169.123, fd00:ec2::123 on
//! IPv6); when a first SNTP probe finds the clock more than [`WAIT_BEYOND`] off, the boot waits
//! for chronyd's step before the first EC2 call, otherwise chronyd steps it in the background.
//! chronyd stays supervised to keep the clock right.

use super::supervisor::LaunchError;
use super::supervisor::ServiceSpec;
use crate::config::Time;
use crate::console::human;
use crate::sys::{run_code, CommandError, CommandSpec, FileError, Output, Paths, System};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

pub const CONF: &str = "/run/spotinit/chrony.conf";
/// uid/gid of `_chrony` in the image.
const CHRONY_UID: u32 = 100;
const CHRONY_GID: u32 = 101;

/// `host`, `host:port`, `[v6]` or `[v6]:port` -> (host, port if given).
fn split_server(spec: &str) -> (String, Option<String>) {
    if let Some(rest) = spec.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => (h.to_string(), p.strip_prefix(':').map(str::to_string)),
            None => (rest.to_string(), None),
        }
    } else {
        match spec.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p.to_string())),
            _ => (spec.to_string(), None),
        }
    }
}

/// A chrony `server` line for a `[time] servers` entry.
pub fn server_line(spec: &str) -> String {
    let (host, port) = split_server(spec);
    let port = port.map(|p| format!(" port {p}")).unwrap_or_default();
    format!("server {host}{port} iburst minpoll 4 maxpoll 4")
}

/// Seconds between 1900 (NTP) and 1970 (Unix).
const NTP_UNIX_OFFSET: f64 = 2_208_988_800.0;

fn ntp_now() -> [u8; 8] {
    let d = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = (d.as_secs() as f64 + NTP_UNIX_OFFSET) as u32;
    let frac = ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000) as u32;
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&secs.to_be_bytes());
    b[4..].copy_from_slice(&frac.to_be_bytes());
    b
}

fn ntp_seconds(b: &[u8]) -> f64 {
    let secs = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as f64;
    let frac = u32::from_be_bytes([b[4], b[5], b[6], b[7]]) as f64 / 4_294_967_296.0;
    secs + frac - NTP_UNIX_OFFSET
}

/// One SNTP exchange (RFC 4330): how far our clock is from `server` (positive: we are behind),
/// or None without a valid answer within `timeout`. Only a measurement: chronyd does the
/// setting and the keeping.
pub async fn offset_from(server: &str, timeout: Duration) -> Option<f64> {
    let (host, port) = split_server(server);
    let port: u16 = port.and_then(|p| p.parse().ok()).unwrap_or(123);
    let addr = std::net::SocketAddr::new(host.parse().ok()?, port);
    let bind = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
    let mut req = [0u8; 48];
    req[0] = (4 << 3) | 3; // version 4, client
    let sent = ntp_now();
    req[40..48].copy_from_slice(&sent);
    let t1 = ntp_seconds(&sent);
    sock.send_to(&req, addr).await.ok()?;
    let mut buf = [0u8; 128];
    let n = tokio::time::timeout(timeout, sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    let t4 = ntp_seconds(&ntp_now());
    reply_offset(&buf[..n], &sent, t1, t4)
}

/// The offset an SNTP reply gives, if it is a server's answer to exactly our request (its
/// origin timestamp is `sent`, our transmit timestamp) from a synchronised server. `t1` and
/// `t4` are when we sent and received, in Unix seconds.
pub fn reply_offset(reply: &[u8], sent: &[u8; 8], t1: f64, t4: f64) -> Option<f64> {
    // Mode 4 (server), stratum 1 to 15 (synchronised), our timestamp as the origin.
    let answer = reply.len() >= 48
        && reply[0] & 7 == 4
        && (1..16).contains(&reply[1])
        && reply[24..32] == sent[..];
    if !answer {
        return None;
    }
    let (t2, t3) = (ntp_seconds(&reply[32..40]), ntp_seconds(&reply[40..48]));
    Some(((t2 - t1) + (t3 - t4)) / 2.0)
}

/// Beyond this offset the boot waits for chronyd's step before its first EC2 call. AWS refuses
/// a request signed more than 5 minutes off (EC2's RequestExpired: 15); a clock 30 s off is already far beyond what
/// QEMU's and Nitro's whole-second RTC explain, so it may be drifting, and the margin is wide.
/// Closer than that, waiting (seconds: chronyd's first exchanges) buys nothing.
pub const WAIT_BEYOND: Duration = Duration::from_secs(30);

/// What the boot does about a measured offset (seconds, positive: we are behind).
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Under a second: chronyd only keeps it right.
    Keep,
    /// Off, but signing works: chronyd steps it while the boot goes on.
    StepInBackground,
    /// Far off: no EC2 call before chronyd has stepped it.
    Wait,
}

pub fn decide(offset: f64) -> Decision {
    let off = offset.abs();
    if off < 1.0 {
        Decision::Keep
    } else if off <= WAIT_BEYOND.as_secs_f64() {
        Decision::StepInBackground
    } else {
        // Also NaN, which no valid reply gives but which must never skip the wait.
        Decision::Wait
    }
}

/// The first answer among the servers, asked at once.
async fn first_offset(servers: &[String]) -> Option<(String, f64)> {
    let mut set = tokio::task::JoinSet::new();
    for s in servers {
        let s = s.clone();
        set.spawn(async move {
            offset_from(&s, Duration::from_secs(1))
                .await
                .map(|o| (s, o))
        });
    }
    while let Some(r) = set.join_next().await {
        if let Ok(Some(found)) = r {
            return Some(found);
        }
    }
    None
}

/// chronyd's configuration: our servers; step the clock whenever it is more than a second off
/// (an instance can start with its clock far off), never just slew.
pub fn chrony_conf(cfg: &Time) -> String {
    let mut s = String::from("# written by spotinit from [time]\n");
    for server in &cfg.servers {
        s.push_str(&server_line(server));
        s.push('\n');
    }
    s.push_str(
        "makestep 1 -1\n\
         driftfile /var/lib/chrony/chrony.drift\n\
         maxupdateskew 100.0\n\
         rtcsync\n",
    );
    s
}

pub fn chronyd(paths: &Paths) -> ServiceSpec {
    use caps::Capability::*;
    ServiceSpec::new(
        "chronyd",
        CommandSpec::new("/usr/sbin/chronyd")
            .args(["-d", "-u", "_chrony", "-f", CONF])
            .output(super::docker::log_output(paths, "chronyd"))
            // Setting the clock, and what it needs to drop to _chrony itself.
            .keep_caps(vec![
                CAP_SYS_TIME,
                CAP_NET_BIND_SERVICE,
                CAP_SETUID,
                CAP_SETGID,
                CAP_CHOWN,
                CAP_DAC_OVERRIDE,
                CAP_FOWNER,
            ]),
    )
    .stop_timeout(Duration::from_secs(3))
}

/// Why chronyd could not be started or asked.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

/// Starts chronyd, and when the clock is far off (or no server answered a first query), waits
/// for its first synchronisation. Returns a line for the console: how far off the clock was and
/// the step made, or why it gave up (then the boot goes on: the clock may well be right).
pub async fn sync<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
    supervisor: &super::Supervisor,
    cfg: &Time,
) -> Result<String, ClockError> {
    let dir = paths.p("/var/lib/chrony");
    std::fs::create_dir_all(&dir).map_err(FileError::at("mkdir", &dir))?;
    std::os::unix::fs::chown(&dir, Some(CHRONY_UID), Some(CHRONY_GID))
        .map_err(FileError::at("chown", &dir))?;
    std::fs::write(paths.p(CONF), chrony_conf(cfg)).map_err(FileError::at("write", CONF))?;
    // Ask the servers first: only a clock far enough off to endanger signing waits for chronyd.
    let probed = first_offset(&cfg.servers).await;
    let (wall0, mono0) = (SystemTime::now(), Instant::now());
    supervisor.launch(chronyd(paths)).await?;
    if let Some((server, offset)) = &probed {
        let off = human(Duration::from_secs_f64(offset.abs()));
        let side = if *offset > 0.0 { "behind" } else { "ahead of" };
        match decide(*offset) {
            Decision::Keep => {
                return Ok(format!(
                    "within {:.0} ms of {server}; chronyd keeps it so",
                    offset.abs() * 1000.0
                ))
            }
            Decision::StepInBackground => {
                return Ok(format!(
                    "{off} {side} {server}: chronyd steps it in the background (the boot waits \
                     only beyond {} s; AWS refuses signatures only minutes off)",
                    WAIT_BEYOND.as_secs()
                ))
            }
            Decision::Wait => crate::log!(
                "clock: {off} {side} {server}: waiting for chronyd to step it before any EC2 call"
            ),
        }
    }
    // waitsync: up to N tries 0.5 s apart, until synchronised with a correction under 1 s.
    let tries = (cfg.sync_timeout_secs * 2).max(1).to_string();
    let wait = CommandSpec::new("/usr/bin/chronyc")
        .args(["-n", "waitsync", &tries, "1", "0", "0.5"])
        .output(Output::Null);
    let synced = run_code(sys, &wait).await? == 0;
    // How far the clock jumped: wall time elapsed minus real time elapsed.
    let wall = SystemTime::now()
        .duration_since(wall0)
        .map(|d| d.as_secs_f64())
        .unwrap_or_else(|e| -e.duration().as_secs_f64());
    let step = wall - mono0.elapsed().as_secs_f64();
    let step_text = if step.abs() < 0.5 && synced {
        "no step needed".to_string()
    } else if step.abs() < 0.5 {
        "the clock was not stepped".to_string()
    } else {
        format!(
            "stepped {} {}",
            if step > 0.0 { "forward" } else { "back" },
            human(Duration::from_secs_f64(step.abs()))
        )
    };
    if synced {
        Ok(format!(
            "synchronised with {} in {} ({step_text})",
            cfg.servers.join(", "),
            human(mono0.elapsed())
        ))
    } else {
        Ok(format!(
            "NOT synchronised with {} within {} s ({step_text}); EC2 calls fail if the clock is more than 5 minutes off — chronyd keeps trying",
            cfg.servers.join(", "),
            cfg.sync_timeout_secs
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lines() {
        assert_eq!(
            server_line("169.254.169.123"),
            "server 169.254.169.123 iburst minpoll 4 maxpoll 4"
        );
        assert_eq!(
            server_line("10.0.2.2:12345"),
            "server 10.0.2.2 port 12345 iburst minpoll 4 maxpoll 4"
        );
        assert_eq!(
            server_line("[fd00:ec2::123]"),
            "server fd00:ec2::123 iburst minpoll 4 maxpoll 4"
        );
        assert_eq!(
            server_line("[fd00:ec2::123]:123"),
            "server fd00:ec2::123 port 123 iburst minpoll 4 maxpoll 4"
        );
    }

    #[test]
    fn a_reply_to_our_request_gives_the_offset() {
        let ntp = |unix: f64| {
            let t = unix + NTP_UNIX_OFFSET;
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&(t as u32).to_be_bytes());
            b[4..].copy_from_slice(&((t.fract() * 4_294_967_296.0) as u32).to_be_bytes());
            b
        };
        let sent = ntp(1_795_694_400.0);
        let (t1, t4) = (ntp_seconds(&sent), 1_795_694_400.5);
        // The server's clock is 10 s ahead: 0.25 s each way, it reads t1 + 10.25 on answering.
        let mut reply = [0u8; 48];
        reply[0] = (4 << 3) | 4; // version 4, server
        reply[1] = 2; // stratum 2
        reply[24..32].copy_from_slice(&sent);
        reply[32..40].copy_from_slice(&ntp(t1 + 10.25));
        reply[40..48].copy_from_slice(&ntp(t1 + 10.25));
        let offset = reply_offset(&reply, &sent, t1, t4).unwrap();
        assert!((offset - 10.0).abs() < 1e-6, "{offset}");
        // Not an answer to this request, not from a server, not synchronised, too short.
        assert_eq!(reply_offset(&reply, &ntp(t1 + 1.0), t1, t4), None);
        let mut client = reply;
        client[0] = (4 << 3) | 3;
        assert_eq!(reply_offset(&client, &sent, t1, t4), None);
        let mut unsynchronised = reply;
        unsynchronised[1] = 0;
        assert_eq!(reply_offset(&unsynchronised, &sent, t1, t4), None);
        assert_eq!(reply_offset(&reply[..47], &sent, t1, t4), None);
    }

    #[test]
    fn only_a_clock_far_off_waits_for_chronyd() {
        assert_eq!(decide(0.2), Decision::Keep);
        assert_eq!(decide(-0.99), Decision::Keep);
        // QEMU's and Nitro's whole-second RTC: the 1.06 s seen at every boot costs nothing.
        assert_eq!(decide(1.06), Decision::StepInBackground);
        assert_eq!(decide(-29.0), Decision::StepInBackground);
        assert_eq!(decide(30.5), Decision::Wait);
        assert_eq!(decide(-6.0 * 3600.0), Decision::Wait);
        assert_eq!(decide(f64::NAN), Decision::Wait);
    }

    #[test]
    fn conf_steps_whenever_off() {
        let c = chrony_conf(&Time::default());
        assert!(c.contains("server 169.254.169.123 "));
        assert!(c.contains("server fd00:ec2::123 "));
        assert!(c.contains("makestep 1 -1"));
    }
}
