//! The forms single values must have: RFC 1123 host names, NTP servers, OpenSSH keys, AWS
//! resource ids, regions and KMS keys, URLs, registries and PEM blocks; how deep TOML nests.

/// A value as a message may show it: at most 64 characters, control characters escaped.
pub(super) fn shown(v: &str) -> String {
    let mut s: String = v.chars().take(64).flat_map(char::escape_debug).collect();
    if v.chars().count() > 64 {
        s.push('…');
    }
    s
}

pub(super) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

pub fn is_resource_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|hex| {
            (8..=17).contains(&hex.len()) && hex.chars().all(|c| c.is_ascii_hexdigit())
        })
}

/// `/dev/sdf` .. `/dev/sdz`, `/dev/xvdf`, `/dev/xvdba`: the names EC2 accepts for an EBS data
/// volume on Linux (not `a`, the root).
pub fn is_device_name(d: &str) -> bool {
    let tail = d
        .strip_prefix("/dev/sd")
        .or_else(|| d.strip_prefix("/dev/xvd"));
    matches!(tail, Some(t) if (1..=2).contains(&t.len()) && t.chars().all(|c| c.is_ascii_lowercase()) && t != "a")
}

/// An RFC 1123 host name the kernel takes (at most 64 bytes): labels of letters, digits and
/// inner hyphens, separated by dots.
pub fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// An NTP server: `host`, `host:port`, `[v6]` or `[v6]:port`, the host an IP literal or an RFC
/// 1123 name. None when it is one.
pub fn time_server_problem(s: &str) -> Option<String> {
    let bad = || {
        Some(format!(
            "'{}' is not an NTP server (expected host, host:port, [ipv6] or [ipv6]:port, the host an IP address or a DNS name)",
            shown(s)
        ))
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return bad();
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return bad();
        }
        match after {
            "" => (h, None),
            a => match a.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return bad(),
            },
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let host_ok = host.parse::<std::net::IpAddr>().is_ok() || is_hostname(host);
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if host_ok && port_ok {
        None
    } else {
        bad()
    }
}

/// Key types dropbear and OpenSSH take in authorized_keys.
const SSH_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Standard base64, as much of it as decodes (enough to read a key blob's first field).
fn base64_prefix(s: &str, want: usize) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        if out.len() >= want {
            break;
        }
        let n = chunk.iter().take_while(|c| **c != b'=').count();
        let mut acc = 0u32;
        for (i, c) in chunk[..n].iter().enumerate() {
            acc |= val(*c)? << (18 - 6 * i);
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..n.max(1)]);
    }
    Some(out)
}

/// One OpenSSH public key: `type base64 [comment]`, a known type, a blob of that type, no
/// options (`command="..."`), no newline. None when it is one.
pub fn ssh_key_problem(k: &str) -> Option<String> {
    let k = k.trim();
    if k.is_empty() || k.len() > 16 << 10 || has_control(k) {
        return Some(
            "not one OpenSSH public key on one line (at most 16 KiB, no control characters)".into(),
        );
    }
    let mut f = k.splitn(3, ' ');
    let (kind, blob) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
    if !SSH_KEY_TYPES.contains(&kind) {
        return Some(if kind.contains('=') || kind.contains(',') {
            "key options (command=, from=, ...) are not supported: give the key alone".into()
        } else {
            format!(
                "not an OpenSSH public key of a known type ({})",
                SSH_KEY_TYPES.join(", ")
            )
        });
    }
    // The blob starts with its own type: a 4-byte length and the name.
    let head = base64_prefix(blob, 4 + kind.len());
    let named = head.as_deref().and_then(|h| {
        let len = u32::from_be_bytes(h.get(..4)?.try_into().ok()?) as usize;
        h.get(4..4 + len)
    });
    if named != Some(kind.as_bytes()) {
        return Some(format!("the key data is not a {kind} key in base64"));
    }
    None
}

/// A KMS key: key id, multi-region key id, alias, or the ARN of a key or an alias.
pub fn is_kms_key(k: &str) -> bool {
    let id = |s: &str| {
        let uuid = s.len() == 36
            && s.chars().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        let mrk = s
            .strip_prefix("mrk-")
            .is_some_and(|h| h.len() == 32 && h.chars().all(|c| c.is_ascii_hexdigit()));
        uuid || mrk
    };
    let alias = |s: &str| {
        s.strip_prefix("alias/").is_some_and(|a| {
            (1..=250).contains(&a.len())
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
        })
    };
    if let Some(rest) = k.strip_prefix("arn:") {
        let f: Vec<&str> = rest.splitn(5, ':').collect();
        return f.len() == 5
            && f[0].starts_with("aws")
            && f[1] == "kms"
            && is_region(f[2])
            && f[3].len() == 12
            && f[3].chars().all(|c| c.is_ascii_digit())
            && (f[4].strip_prefix("key/").is_some_and(id) || alias(f[4]));
    }
    id(k) || alias(k)
}

/// `eu-west-1`, `us-gov-west-1`, `ap-southeast-4`.
pub fn is_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()))
}

/// An http(s) URL with a host, on one line.
pub(super) fn is_url(u: &str) -> bool {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"));
    rest.is_some_and(|r| {
        u.len() <= 2048
            && !r.is_empty()
            && !r.starts_with('/')
            && !u.chars().any(|c| c.is_whitespace() || c.is_control())
    })
}

/// A registry as image references name it: a host name or an address, and an optional port.
/// It becomes a directory name under /etc/docker/certs.d, so nothing else gets through.
pub(super) fn is_registry_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with(['.', '-'])
        && !host.contains("..")
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    host_ok && port_ok
}

/// A PEM block of this kind (`CERTIFICATE`, or any `... PRIVATE KEY`).
pub(super) fn is_pem(text: &str, kind: &str) -> bool {
    let t = text.trim();
    t.starts_with("-----BEGIN ")
        && t.ends_with("-----")
        && t.lines().next().is_some_and(|l| l.contains(kind))
        && t.len() <= 64 << 10
}

/// How deep a TOML value nests (a scalar is 0), without recursing.
pub fn depth(v: &toml::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        deepest = deepest.max(d);
        match v {
            toml::Value::Table(t) => stack.extend(t.values().map(|c| (c, d + 1))),
            toml::Value::Array(a) => stack.extend(a.iter().map(|c| (c, d + 1))),
            _ => {}
        }
    }
    deepest
}
