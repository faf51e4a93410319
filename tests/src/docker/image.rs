//! The counter image: busybox-static, its applets, an entrypoint and the CGI scripts, as a
//! tarball made on the host; imported through the API or pushed to the test registry.

use tar::{Builder, EntryType, Header};

use super::Docker;
use crate::qemu::{Error, Result};

/// The image the counter runs from.
pub const COUNTER_IMAGE: (&str, &str) = ("spotworld/counter", "1");

/// The container's PID 1: busybox httpd in the foreground, stopped cleanly on SIGTERM (a bare
/// httpd as PID 1 of its namespace would ignore SIGTERM and be killed after the stop timeout).
const ENTRYPOINT: &str = "#!/bin/sh
httpd -f -p 80 -h /www &
pid=$!
trap 'kill $pid; wait $pid; exit 0' TERM INT
wait $pid
";

/// `/cgi-bin/increment`: the durable increment described at the top of the module.
const INCREMENT: &str = "#!/bin/sh
set -e
f=/data/count
n=$(cat $f 2>/dev/null || echo 0)
n=$((n + 1))
echo $n > $f.tmp
sync $f.tmp
mv $f.tmp $f
sync -f $f
printf 'Content-Type: text/plain\\r\\n\\r\\ncount=%s\\n' $n
";

/// `/cgi-bin/value`: the count without changing it.
const VALUE: &str = "#!/bin/sh
n=$(cat /data/count 2>/dev/null || echo 0)
printf 'Content-Type: text/plain\\r\\n\\r\\ncount=%s\\n' $n
";

/// The counter image as a tarball: busybox-static with its applets, the entrypoint, the CGI
/// scripts. Needs `/bin/busybox` to be statically linked (package busybox-static).
pub fn counter_image_tar() -> Result<Vec<u8>> {
    let busybox_path = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .ok_or_else(|| Error::new("no /bin/busybox: apt-get install busybox-static"))?;
    let busybox =
        std::fs::read(busybox_path).map_err(|e| Error::new(format!("read {busybox_path}: {e}")))?;
    if !is_static_elf(&busybox) {
        return Err(Error::new(format!(
            "{busybox_path} is dynamically linked and would not run in an empty image: \
             apt-get install busybox-static"
        )));
    }
    let list = std::process::Command::new(busybox_path)
        .arg("--list-full")
        .output()
        .map_err(|e| Error::new(format!("{busybox_path} --list-full: {e}")))?;
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();
    image_tar(&busybox, &applets).map_err(|e| Error::new(format!("counter image tar: {e}")))
}

/// The image's entries in a fixed order, so every build gives the same bytes.
fn image_tar(busybox: &[u8], applets: &str) -> std::io::Result<Vec<u8>> {
    let mut tar = Builder::new(Vec::new());
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "www",
        "www/cgi-bin",
        "tmp",
        "data",
        "proc",
        "sys",
        "dev",
        "etc",
    ] {
        let mode = if dir == "tmp" { 0o1777 } else { 0o755 };
        let mut header = root_header(EntryType::Directory, mode, 0)?;
        tar.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
    }
    append_file(&mut tar, "bin/busybox", 0o755, busybox)?;
    for applet in applets.lines().map(str::trim) {
        if !applet.is_empty() && applet != "bin/busybox" {
            let mut header = root_header(EntryType::Symlink, 0o777, 0)?;
            tar.append_link(&mut header, applet, "/bin/busybox")?;
        }
    }
    append_file(&mut tar, "bin/serve", 0o755, ENTRYPOINT.as_bytes())?;
    append_file(
        &mut tar,
        "www/cgi-bin/increment",
        0o755,
        INCREMENT.as_bytes(),
    )?;
    append_file(&mut tar, "www/cgi-bin/value", 0o755, VALUE.as_bytes())?;
    append_file(
        &mut tar,
        "www/index.html",
        0o644,
        b"spotworld counter: /cgi-bin/increment, /cgi-bin/value\n",
    )?;
    append_file(
        &mut tar,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/:/bin/sh\n",
    )?;
    append_file(&mut tar, "etc/group", 0o644, b"root:x:0:\n")?;
    tar.into_inner()
}

fn append_file(
    tar: &mut Builder<Vec<u8>>,
    name: &str,
    mode: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut header = root_header(EntryType::Regular, mode, data.len() as u64)?;
    tar.append_data(&mut header, name, data)
}

/// A ustar header owned by root/root with time 0.
fn root_header(kind: EntryType, mode: u32, size: u64) -> std::io::Result<Header> {
    let mut header = Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_username("root")?;
    header.set_groupname("root")?;
    Ok(header)
}

/// Imports the counter image (`docker import` of [`counter_image_tar`]).
pub async fn import_counter_image(docker: &Docker) -> Result<String> {
    let tar = counter_image_tar()?;
    docker
        .import_image(tar, COUNTER_IMAGE.0, COUNTER_IMAGE.1)
        .await
}

/// Pushes the counter image to the test registry as `spotworld/counter:<tag>`.
pub async fn push_counter_image(
    registry: &crate::registry::Registry,
    tag: &str,
) -> Result<crate::registry::PushedImage> {
    let layer = counter_image_tar()?;
    registry
        .push(COUNTER_IMAGE.0, tag, &layer, &["/bin/serve"])
        .await
}

/// An ELF file without a `PT_INTERP` program header runs without a dynamic loader.
fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // p_type 3 = PT_INTERP.
        o + 4 <= b.len() && u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) != 3
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive is one GNU tar reads: every entry, symlinks pointing at busybox.
    #[test]
    fn counter_image_is_a_valid_tar_with_the_applets() {
        let tar = counter_image_tar().expect("busybox-static is installed");
        assert_eq!(tar.len() % 512, 0);
        let dir = crate::moto::unique_temp_dir("spotworld-tar").unwrap();
        let file = dir.join("image.tar");
        std::fs::write(&file, &tar).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&file)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(listing.contains("bin/sh -> /bin/busybox"), "{listing}");
        assert!(listing.contains("bin/busybox"), "{listing}");
        assert!(listing.contains("www/cgi-bin/increment"), "{listing}");
        assert!(listing.contains("-rwxr-xr-x root/root"), "{listing}");
    }

    /// Read back with `tar::Archive`: names in order, root-owned at time 0, modes, contents.
    #[test]
    fn counter_image_reads_back_and_is_deterministic() {
        let tar = counter_image_tar().expect("busybox-static is installed");
        assert_eq!(tar, counter_image_tar().unwrap(), "two builds differ");
        let busybox = std::fs::read("/bin/busybox").unwrap();
        let mut entries = Vec::new();
        for entry in tar::Archive::new(&tar[..]).entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header();
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
            assert_eq!(header.mtime().unwrap(), 0);
            assert_eq!(header.username().unwrap(), Some("root"));
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mode = header.mode().unwrap();
            let kind = header.entry_type();
            let link = entry.link_name().unwrap().map(|l| l.into_owned());
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            entries.push((name, mode, kind, link, data));
        }
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.0 == name)
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(entries[0].0, "bin/");
        assert_eq!(find("tmp/").1, 0o1777);
        assert_eq!(find("tmp/").2, EntryType::Directory);
        let bb = find("bin/busybox");
        assert_eq!((bb.1, bb.2), (0o755, EntryType::Regular));
        assert!(bb.4 == busybox, "bin/busybox is not /bin/busybox");
        let sh = find("bin/sh");
        assert_eq!(sh.2, EntryType::Symlink);
        assert_eq!(sh.3.as_deref(), Some(std::path::Path::new("/bin/busybox")));
        let increment = find("www/cgi-bin/increment");
        assert_eq!(
            (increment.1, &increment.4[..]),
            (0o755, INCREMENT.as_bytes())
        );
        assert_eq!(find("bin/serve").4, ENTRYPOINT.as_bytes());
        assert_eq!(find("www/cgi-bin/value").4, VALUE.as_bytes());
        assert_eq!(find("etc/passwd").1, 0o644);
        assert_eq!(entries.last().unwrap().0, "etc/group");
    }

    #[test]
    fn host_busybox_is_static() {
        let b = std::fs::read("/bin/busybox").unwrap();
        assert!(is_static_elf(&b));
        let dynamic = std::fs::read("/bin/ls").unwrap();
        assert!(!is_static_elf(&dynamic));
    }
}
