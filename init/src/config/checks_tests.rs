//! Unit tests of the configuration checks: the forms of time servers, keys, host names, tags and resource ids, the bounds, and the daemon settings that are refused.

use super::*;

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop";

fn keys_of(user: &str) -> Vec<String> {
    match Config::load("", Some(user), None) {
        Ok(_) => Vec::new(),
        Err(e) => e.into_iter().filter_map(|e| e.key).collect(),
    }
}

#[test]
fn time_servers_are_hosts_and_ports_nothing_else() {
    for ok in [
        "169.254.169.123",
        "[fd00:ec2::123]",
        "[fd00:ec2::123]:123",
        "10.0.2.2:12345",
        "time.aws.com",
        "pool.ntp.org:123",
    ] {
        assert_eq!(time_server_problem(ok), None, "{ok}");
    }
    for bad in [
        "time.aws.com\ncmdallow all",
        "a b",
        "include /etc/shadow",
        "host:0",
        "host:99999",
        "[::1",
        "[not-v6]:1",
        "-bad.example",
        "",
    ] {
        assert!(time_server_problem(bad).is_some(), "{bad:?}");
    }
    assert_eq!(
        keys_of("[time]\nservers = [\"169.254.169.123\\ninclude /x\"]\n"),
        ["time.servers"]
    );
}

#[test]
fn ssh_keys_are_one_known_key_each() {
    assert_eq!(ssh_key_problem(ED25519), None);
    assert_eq!(
        ssh_key_problem(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
        ),
        None
    );
    let two = format!("{ED25519}\n{ED25519}");
    assert!(ssh_key_problem(&two).unwrap().contains("one line"));
    assert!(ssh_key_problem(&format!("command=\"/bin/sh\" {ED25519}"))
        .unwrap()
        .contains("options"));
    assert!(ssh_key_problem("ssh-dss AAAAB3NzaC1kc3M=").is_some());
    // A blob of another type under this name.
    assert!(ssh_key_problem(
        "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    )
    .unwrap()
    .contains("not a ssh-rsa key"));
    assert!(ssh_key_problem("ssh-ed25519 !!!!").is_some());
}

#[test]
fn hostnames_are_rfc_1123() {
    for ok in ["gitlab", "ip-10-0-2-15", "a.b-c.d", "x1"] {
        assert!(is_hostname(ok), "{ok}");
    }
    for bad in ["", "-a", "a-", "a..b", "a b", "a_b", &"a".repeat(65), "é"] {
        assert!(!is_hostname(bad), "{bad}");
    }
    assert_eq!(keys_of("hostname = \"git lab\"\n"), ["hostname"]);
}

#[test]
fn tags_follow_ec2s_limits_and_leave_reserved_prefixes_alone() {
    let long = "k".repeat(129);
    let user = format!(
        "[volume.tags]\nName = \"x\"\n\"aws:cloudformation:stack-name\" = \"s\"\n\"spotinit:moving\" = \"i\"\n{long} = \"v\"\nValue = \"{}\"\n",
        "v".repeat(257)
    );
    let mut k = keys_of(&user);
    k.sort();
    assert_eq!(k.len(), 4, "{k:?}");
    assert!(k.iter().any(|k| k.starts_with("volume.tags.aws:")));
    assert!(k.iter().any(|k| k == "volume.tags.spotinit:moving"));
    assert!(k.iter().any(|k| k == "volume.tags.Value"));
}

#[test]
fn kms_keys_regions_endpoints_labels_and_interfaces_have_their_forms() {
    for ok in [
        "1234abcd-12ab-34cd-56ef-1234567890ab",
        "mrk-1234abcd12ab34cd56ef1234567890ab",
        "alias/ebs-state",
        "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:eu-west-1:111122223333:alias/ebs-state",
    ] {
        assert!(is_kms_key(ok), "{ok}");
    }
    for bad in ["key", "arn:aws:kms:eu-west-1:1:key/x", "alias/", "1234"] {
        assert!(!is_kms_key(bad), "{bad}");
    }
    assert!(is_region("eu-west-1") && is_region("us-gov-west-1"));
    assert!(!is_region("eu_west_1") && !is_region("west") && !is_region("eu-west-x"));
    let k = keys_of("[volume]\nlabel = \"a-label-of-17-byt\"\n[network]\ninterface = \"eth0; reboot\"\n[aws]\nec2_endpoint = \"http://x y\"\nregion = \"mars\"\n");
    assert_eq!(k.len(), 4, "{k:?}");
}

#[test]
fn every_duration_and_count_is_bounded() {
    let user = "[snapshots]\ninterval_minutes = 9223372036854775807\nkeep = 0\n[volume]\nattach_timeout_secs = 9999999999\n[docker]\nstop_timeout_secs = 0\n[ssh]\nport = 0\n";
    let mut k = keys_of(user);
    k.sort();
    assert_eq!(
        k,
        [
            "docker.stop_timeout_secs",
            "snapshots.interval_minutes",
            "snapshots.keep",
            "ssh.port",
            "volume.attach_timeout_secs"
        ]
    );
    // Within the bounds nothing overflows: interval × 60 fits, Instant + it too.
    let c = Config::load("", Some("[snapshots]\ninterval_minutes = 43200\n"), None).unwrap();
    let d = std::time::Duration::from_secs(c.snapshots.interval_minutes * 60);
    assert!(std::time::Instant::now().checked_add(d).is_some());
}

#[test]
fn daemon_settings_cannot_open_the_firewall_or_the_api() {
    let k = keys_of("[docker.daemon]\niptables = false\nip6tables = false\nfirewall-backend = \"nftables\"\ntlsverify = false\n");
    assert_eq!(
        k,
        [
            "docker.daemon.tlsverify",
            "docker.daemon.iptables",
            "docker.daemon.ip6tables",
            "docker.daemon.firewall-backend"
        ]
    );
    // Knowingly, without the IMDS block.
    assert!(
        keys_of("[docker]\nblock_imds = false\n[docker.daemon]\niptables = false\n").is_empty()
    );
    let plain = "[docker.daemon]\nhosts = [\"tcp://0.0.0.0:2375\"]\n";
    let e = Config::load("", Some(plain), None).unwrap_err();
    assert!(e[0].message.contains("root on the host"), "{}", e[0]);
    assert_eq!(e[0].line, Some(2));
    assert!(keys_of(&format!("[docker]\ninsecure_plain_tcp_api = true\n{plain}")).is_empty());
    let cert = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----";
    let key = "-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----";
    let tls = format!("[docker.tls]\nca = \"{cert}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n{plain}");
    assert!(keys_of(&tls).is_empty(), "{:?}", keys_of(&tls));
    assert!(keys_of(&format!("[docker.tls]\non_volume = true\n{plain}")).is_empty());
    assert_eq!(
        keys_of(&format!("[docker.tls]\nca = \"{cert}\"\n{plain}"))[0],
        "docker.tls"
    );
    assert_eq!(
        keys_of("[docker.tls]\nca = \"x\"\ncert = \"x\"\nkey = \"x\"\n"),
        ["docker.tls.ca", "docker.tls.cert", "docker.tls.key"]
    );
}

#[test]
fn registry_cas_name_a_registry_and_hold_a_certificate() {
    let cert = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----";
    for good in ["registry.example.com", "10.0.2.2:5443", "localhost:5000"] {
        let toml = format!("[docker.registry_cas]\n\"{good}\" = \"{cert}\"\n");
        assert!(keys_of(&toml).is_empty(), "{good}: {:?}", keys_of(&toml));
    }
    // Each would be a path outside certs.d/, or not a registry at all.
    for bad in [
        "../../etc",
        "a/b",
        "",
        "host:0",
        "host:99999",
        ".hidden",
        "-x",
        "a..b",
    ] {
        let toml = format!("[docker.registry_cas]\n\"{bad}\" = \"{cert}\"\n");
        assert_eq!(
            keys_of(&toml),
            [format!("docker.registry_cas.\"{bad}\"")],
            "{bad}"
        );
    }
    assert_eq!(
        keys_of("[docker.registry_cas]\n\"r.example:5000\" = \"not a cert\"\n"),
        ["docker.registry_cas.\"r.example:5000\""]
    );
}

#[test]
fn daemon_nesting_is_capped_without_recursing() {
    let mut v = toml::Value::Integer(1);
    for _ in 0..100_000 {
        v = toml::Value::Array(vec![v]);
    }
    assert_eq!(depth(&v), 100_000);
    let mut nested = String::from("1");
    for _ in 0..20 {
        nested = format!("[{nested}]");
    }
    let k = keys_of(&format!("[docker.daemon]\nx = {nested}\n"));
    assert_eq!(k, ["docker.daemon.x"]);
    // Dropping such a value must not recurse either (a stack overflow in PID 1 is a
    // kernel panic): forget it here, the parser refuses deeper than 80 anyway.
    std::mem::forget(v);
}

#[test]
fn a_pool_has_a_host_name_safe_name_a_maximum_and_no_volume_id() {
    let pool = |extra: &str| keys_of(&format!("[volume]\n{extra}\n"));
    assert_eq!(
        pool("pool = \"runners\"\npool_max = 3"),
        Vec::<String>::new()
    );
    assert_eq!(
        pool("pool = \"runners\"\ncreate = false"),
        Vec::<String>::new()
    );
    for bad in ["Runners", "a_b", "-a", "a-", "", "a.b", &"a".repeat(51)] {
        assert_eq!(
            pool(&format!("pool = \"{bad}\"\npool_max = 2")),
            ["volume.pool"],
            "{bad:?}"
        );
    }
    assert_eq!(pool("pool = \"runners\""), ["volume.pool_max"]);
    assert_eq!(pool("pool = \"r\"\npool_max = 1001"), ["volume.pool_max"]);
    assert_eq!(
        pool("pool = \"r\"\npool_max = 2\nid = \"vol-0123456789abcdef0\""),
        ["volume.pool"]
    );
}

#[test]
fn an_elastic_ip_per_slot_needs_a_pool_and_no_single_elastic_ip() {
    let pool = "[volume]\npool = \"r\"\npool_max = 2\n";
    assert_eq!(
        keys_of(&format!("{pool}[address]\nfrom_pool = true\n")),
        Vec::<String>::new()
    );
    assert_eq!(
        keys_of("[address]\nfrom_pool = true\n"),
        ["address.from_pool"]
    );
    assert_eq!(
        keys_of(&format!(
            "{pool}[address]\nfrom_pool = true\nelastic_ip_allocation_id = \"eipalloc-0123456789abcdef0\"\n"
        )),
        ["address.from_pool"]
    );
}
