//! Unit tests of the configuration loader: defaults, the precedence of the three sources, and errors that name the key and line.

use super::*;

#[test]
fn defaults_are_valid_and_find_the_volume_by_name_tag() {
    let c = Config::load("", None, None).unwrap();
    assert_eq!(c.volume.tags.get("Name").unwrap(), "spotinit-state");
    assert!(c.volume.create);
    assert_eq!(c.docker.storage_driver, "overlay2");
    assert_eq!(c.failure.action, FailureAction::Poweroff);
}

#[test]
fn precedence_is_cmdline_then_user_data_then_image_file() {
    let image = "[volume]\nsize_gib = 30\ntype = \"gp2\"\n";
    let user = "[volume]\nsize_gib = 40\n[volume.tags]\nName = \"gitlab\"\n";
    let cmdline =
        "console=ttyS0 spotinit.volume.size_gib=50 spotinit.imds_endpoint=http://10.0.2.2:8111";
    let c = Config::load(cmdline, Some(user), Some(image)).unwrap();
    assert_eq!(c.volume.size_gib, 50);
    assert_eq!(c.volume.volume_type, "gp2");
    assert_eq!(c.volume.tags.get("Name").unwrap(), "gitlab");
    assert_eq!(c.imds_endpoint.as_deref(), Some("http://10.0.2.2:8111"));
}

#[test]
fn unknown_key_names_line_and_expected_keys() {
    let user = "[volume]\nsize_gib = 10\nsizee = 5\n";
    let e = Config::load("", Some(user), None).unwrap_err();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].source, Source::UserData);
    assert_eq!(e[0].line, Some(3));
    assert!(e[0].message.contains("unknown field `sizee`"), "{}", e[0]);
    assert!(e[0].message.contains("size_gib"), "{}", e[0]);
}

#[test]
fn wrong_type_names_line() {
    let user = "[docker]\nstop_timeout_secs = \"soon\"\n";
    let e = Config::load("", Some(user), None).unwrap_err();
    assert_eq!(e[0].line, Some(2));
    assert!(e[0].message.contains("invalid type"), "{}", e[0]);
}

#[test]
fn malformed_toml_names_line() {
    let e = Config::load("", Some("[volume\nid = 1"), None).unwrap_err();
    assert_eq!(e[0].source, Source::UserData);
    assert_eq!(e[0].line, Some(1));
}

#[test]
fn shell_script_user_data_is_explained() {
    let e = Config::load("", Some("#!/bin/bash\necho hi\n"), None).unwrap_err();
    assert!(e[0].message.contains("shell script"), "{}", e[0]);
}

#[test]
fn semantic_problems_name_key_and_line() {
    let user = "[volume]\ntype = \"gp9\"\nsize_gib = 0\n[docker.daemon]\ndata-root = \"/x\"\n";
    let e = Config::load("", Some(user), None).unwrap_err();
    let keys: Vec<_> = e.iter().map(|e| e.key.clone().unwrap()).collect();
    assert!(keys.contains(&"volume.type".to_string()));
    assert!(keys.contains(&"volume.size_gib".to_string()));
    assert!(keys.contains(&"docker.daemon.data-root".to_string()));
    let t = e
        .iter()
        .find(|e| e.key.as_deref() == Some("volume.type"))
        .unwrap();
    assert_eq!(t.line, Some(2));
    assert!(t.message.contains("gp3"));
}

#[test]
fn bad_cmdline_value_names_the_key() {
    let e = Config::load("spotinit.volume.size_gib=lots", None, None).unwrap_err();
    assert_eq!(e[0].source, Source::KernelCommandLine);
    assert_eq!(e[0].key.as_deref(), Some("spotinit.volume.size_gib"));
    let e = Config::load("spotinit.volume.sise=3", None, None).unwrap_err();
    assert!(e[0].message.contains("unknown field `sise`"));
}

#[test]
fn volume_id_and_device_are_checked() {
    let e = Config::load(
        "",
        Some("[volume]\nid = \"volume-1\"\ndevice = \"/dev/sda\"\n"),
        None,
    )
    .unwrap_err();
    let keys: Vec<_> = e.iter().filter_map(|e| e.key.clone()).collect();
    assert_eq!(keys, vec!["volume.id", "volume.device"]);
    assert!(Config::load("", Some("[volume]\nid = \"vol-0123456789abcdef0\"\n"), None).is_ok());
}
