//! Unit tests of the Docker start: daemon.json, TLS and registry CA files, the IMDS firewall rules, and the readiness ping.

use super::*;

#[test]
fn daemon_json_has_our_keys_and_the_users() {
    let mut cfg = Docker::default();
    cfg.daemon.insert("log-driver".into(), "local".into());
    cfg.daemon.insert(
        "hosts".into(),
        toml::Value::Array(vec!["tcp://0.0.0.0:2375".into()]),
    );
    let j = daemon_json(&cfg, None);
    assert_eq!(j["data-root"], "/var/lib/docker");
    assert_eq!(j["storage-driver"], "overlay2");
    assert_eq!(j["log-driver"], "local");
    assert_eq!(j["shutdown-timeout"], 60);
    assert_eq!(
        j["hosts"],
        serde_json::json!(["unix:///run/docker.sock", "tcp://0.0.0.0:2375"])
    );
}

#[test]
fn tls_from_user_data_is_written_with_a_private_key_and_named_in_daemon_json() {
    use std::os::unix::fs::PermissionsExt;
    let root = std::env::temp_dir().join(format!("spotinit-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let paths = Paths::under(&root);
    let mut cfg = Docker::default();
    assert_eq!(tls_files(&paths, &cfg).unwrap(), None);
    cfg.tls.ca = Some("-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".into());
    cfg.tls.cert = Some("-----BEGIN CERTIFICATE-----\nS\n-----END CERTIFICATE-----\n".into());
    cfg.tls.key = Some("-----BEGIN PRIVATE KEY-----\nK\n-----END PRIVATE KEY-----\n".into());
    let files = tls_files(&paths, &cfg).unwrap().unwrap();
    let mode = std::fs::metadata(&files.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&files.ca).unwrap().contains("CA"));
    let j = daemon_json(&cfg, Some(&files));
    assert_eq!(j["tlsverify"], true);
    assert_eq!(j["tlskey"], files.key.display().to_string());
    // On the volume: missing files are named.
    cfg.tls = crate::config::DockerTls {
        on_volume: true,
        ..Default::default()
    };
    let e = tls_files(&paths, &cfg).unwrap_err().to_string();
    assert!(
        e.contains("ca.pem") && e.contains(".spotinit/docker-tls"),
        "{e}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn registry_cas_are_written_where_dockerd_looks_per_registry() {
    let root = std::env::temp_dir().join(format!("spotinit-certs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let paths = Paths::under(&root);
    let mut cfg = Docker::default();
    assert_eq!(write_registry_cas(&paths, &cfg).unwrap(), 0);
    assert!(!paths.p(REGISTRY_CERTS_DIR).exists());
    let pem = "-----BEGIN CERTIFICATE-----\nR\n-----END CERTIFICATE-----\n";
    cfg.registry_cas.insert("10.0.2.2:5443".into(), pem.into());
    cfg.registry_cas
        .insert("registry.example.com".into(), pem.into());
    assert_eq!(write_registry_cas(&paths, &cfg).unwrap(), 2);
    for r in ["10.0.2.2:5443", "registry.example.com"] {
        let path = paths.p(REGISTRY_CERTS_DIR).join(r).join("ca.crt");
        assert_eq!(std::fs::read_to_string(path).unwrap(), pem);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn imds_rules_cover_the_link_local_addresses_and_the_endpoint_in_use() {
    let r = imds_block_rules(None);
    assert_eq!(r.len(), 3);
    assert_eq!(
        r[0].args,
        [
            "-w",
            "-I",
            "DOCKER-USER",
            "-d",
            "169.254.169.254/32",
            "-j",
            "REJECT"
        ]
    );
    assert!(r[1].program.ends_with("ip6tables"));
    // Docker 26 without its experimental ip6tables never jumps to DOCKER-USER for IPv6.
    assert!(r[2].program.ends_with("ip6tables"));
    assert_eq!(
        r[2].args,
        [
            "-w",
            "-I",
            "FORWARD",
            "-d",
            "fd00:ec2::254/128",
            "-j",
            "REJECT"
        ]
    );
    let r = imds_block_rules(Some("http://10.0.2.2:8111"));
    assert_eq!(r.len(), 4);
    assert_eq!(
        r[3].args,
        [
            "-w",
            "-I",
            "DOCKER-USER",
            "-d",
            "10.0.2.2/32",
            "-p",
            "tcp",
            "--dport",
            "8111",
            "-j",
            "REJECT"
        ]
    );
    assert_eq!(imds_block_rules(Some("http://169.254.169.254")).len(), 3);
}

#[tokio::test]
async fn ping_reads_an_engine_api_answer() {
    let dir = std::env::temp_dir().join(format!("spotinit-ping-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("docker.sock");
    let _ = std::fs::remove_file(&sock);
    assert!(!ping(&sock).await);
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /_ping "));
            s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                .await
                .unwrap();
        }
    });
    assert!(wait_for_ping(&sock, Duration::from_secs(5)).await.is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_daemon_json_that_cannot_be_written_names_the_file() {
    let root = std::env::temp_dir().join(format!("spotinit-daemonjson-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let paths = Paths::under(&root);
    let path = write_daemon_json(&paths, &Docker::default(), None).unwrap();
    assert_eq!(path, paths.p(DAEMON_JSON));
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let e = write_daemon_json(&paths, &Docker::default(), None).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "write {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(libc::EISDIR)
        )
    );
    assert_eq!(e.source.raw_os_error(), Some(libc::EISDIR));
    std::fs::remove_dir_all(&root).unwrap();
}
