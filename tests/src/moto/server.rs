//! The moto server process: started on a free loopback port, waited for, killed with its
//! process group on drop.

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::client::Ec2Client;
use super::temp_dir::unique_temp_dir;

const INSTALL_HINT: &str = "install it with `pip install -r tests/requirements.txt`";
/// How long moto may take to answer its first EC2 request (it loads its AMI catalogue then).
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
const PORT_ATTEMPTS: usize = 5;

/// A running `moto_server` on a free loopback port; killed (with its process group) on drop.
pub struct MotoServer {
    child: Child,
    endpoint: String,
    dir: PathBuf,
}

impl MotoServer {
    /// Starts `moto_server -H 127.0.0.1 -p <free port>` and waits until it answers an EC2
    /// request (which also loads its EC2 backend, so later calls are fast).
    pub async fn start() -> Result<MotoServer, String> {
        let dir = unique_temp_dir("spotworld-moto")
            .map_err(|e| format!("moto: cannot create a temporary directory: {e}"))?;
        let log = dir.join("moto_server.log");
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().map_err(|e| format!("moto: no free port: {e}"))?;
            match Self::start_on(port, &dir, &log).await {
                Ok(child) => {
                    return Ok(MotoServer {
                        child,
                        endpoint: format!("http://127.0.0.1:{port}"),
                        dir,
                    })
                }
                Err(StartError::PortTaken(e)) => last_error = e,
                Err(StartError::Fatal(e)) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!(
            "moto: could not bind a port in {PORT_ATTEMPTS} attempts; last: {last_error}"
        ))
    }

    async fn start_on(port: u16, dir: &Path, log: &Path) -> Result<Child, StartError> {
        let log_file = File::create(log).map_err(|e| {
            StartError::Fatal(format!("moto: cannot create {}: {e}", log.display()))
        })?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| StartError::Fatal(format!("moto: cannot dup log file: {e}")))?;
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            // Its own process group, so Drop can kill whatever it spawned with it.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    StartError::Fatal(format!("moto_server is not on PATH: {INSTALL_HINT}"))
                } else {
                    StartError::Fatal(format!("moto: cannot run moto_server: {e}"))
                }
            })?;
        let client = Ec2Client::new(&format!("http://127.0.0.1:{port}"));
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let output = read_tail(log, 4000);
                if output.contains("Address already in use") {
                    return Err(StartError::PortTaken(format!("port {port}: {output}")));
                }
                if status.code() == Some(127) || output.contains("command not found") {
                    return Err(StartError::Fatal(format!(
                        "moto_server is not installed ({}): {INSTALL_HINT}",
                        output.trim()
                    )));
                }
                return Err(StartError::Fatal(format!(
                    "moto_server exited with {status} before answering; its log:\n{output}"
                )));
            }
            match client.call("DescribeAvailabilityZones", &[]).await {
                Ok(_) => return Ok(child),
                Err(e) if Instant::now() >= deadline => {
                    kill_group(&mut child);
                    return Err(StartError::Fatal(format!(
                        "moto_server on port {port} did not answer DescribeAvailabilityZones \
                         within {STARTUP_DEADLINE:?} (last error: {e}); its log:\n{}",
                        read_tail(log, 4000)
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A raw EC2 client talking to moto directly.
    pub fn client(&self) -> Ec2Client {
        Ec2Client::new(&self.endpoint)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum StartError {
    PortTaken(String),
    Fatal(String),
}

fn kill_group(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) with the negated pid of the group this child leads.
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
    }
    let _ = child.wait();
}

/// A port that was free a moment ago (moto binds it itself; the caller retries on a race).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn read_tail(path: &Path, max: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    if text.len() > max {
        let mut start = text.len() - max;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text = text[start..].to_string();
    }
    text
}
