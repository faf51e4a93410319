//! `cargo bench -p spotinit --bench boot`: spotinit's own time from start to the exec of
//! containerd, with every wait answered at once (fake system, fake cloud, daemons that open
//! their sockets instantly): the cost of spotinit itself, not of the kernel, DHCP, EC2 or
//! dockerd. Its memory once Docker is up is measured in the VM (the `ready` console line
//! carries VmRSS; the simulator's benchmark prints it).

use spotinit::boot::boot;
use spotinit::machine::{BootState, Machine, Mode};
use spotinit::sys::Paths;
use spotinit::testkit::{world, Script};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = 200;
    let mut to_containerd = Vec::with_capacity(runs);
    let mut to_ready = Vec::with_capacity(runs);
    for i in 0..runs {
        rt.block_on(async {
            let (fake, cloud, root) = world(&format!("bench{i}"), None, Script::Mount);
            let exec_at: Arc<Mutex<Option<Instant>>> = Arc::default();
            let at = exec_at.clone();
            // Chain after the socket-opening hook the testkit installs for containerd.
            let sock = root.join("run/containerd/containerd.sock");
            fake.on_spawn("containerd", move |_| {
                *at.lock().unwrap() = Some(Instant::now());
                std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
                let _ = std::fs::remove_file(&sock);
                let l = tokio::net::UnixListener::bind(&sock).unwrap();
                tokio::spawn(async move { while l.accept().await.is_ok() {} });
            });
            let (m, _rx) = Machine::new(Arc::new(fake), Paths::under(&root), Mode::Pid1);
            let mut st = BootState::default();
            let start = Instant::now();
            boot(&m, &cloud, &mut st).await.expect("boot");
            to_ready.push(start.elapsed());
            let exec = exec_at.lock().unwrap().expect("containerd spawned");
            to_containerd.push(exec - start);
            let _ = std::fs::remove_dir_all(&root);
        });
    }
    report("start -> exec of containerd", &mut to_containerd);
    report(
        "start -> ready (fake dockerd answers at once)",
        &mut to_ready,
    );
}

fn report(what: &str, v: &mut [Duration]) {
    v.sort();
    let pct = |p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    println!(
        "{what}: median {:.2} ms, p90 {:.2} ms, max {:.2} ms over {} boots (target: under 50 ms)",
        pct(50).as_secs_f64() * 1e3,
        pct(90).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
        v.len()
    );
}
