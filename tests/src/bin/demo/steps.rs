//! The pieces the steps share: the user data, a launch, the ready line, a spot interruption,
//! and the counter checked on a successor.

use std::time::{Duration, Instant};

use spotworld::docker::{Counter, COUNTER_VOLUME};
use spotworld::qemu::ConsoleLine;
use spotworld::registry::{PushedImage, Registry};
use spotworld::world::{InstanceSpec, SimInstance, UserData, World};

use crate::{e, BOOT, STEP, VOLUME_NAME};

/// Every instance's user data: the volume, the registry's CA, and the counter declared. The
/// Engine API stays on its unix socket: nothing is deployed through it.
pub fn user_data(registry: &Registry, counter: &PushedImage) -> Result<String, String> {
    let mut u = UserData::new(VOLUME_NAME);
    u.docker_api = false;
    u.extra = format!(
        "{}\n[[containers]]\nname = \"counter\"\nimage = \"{}\"\nports = [\"{}:80\"]\n\
         volumes = [\"{COUNTER_VOLUME}:/data\"]\nrestart = \"always\"\n",
        registry.registry_cas_toml().map_err(e)?,
        counter.reference,
        spotworld::world::SERVICE_PORT
    );
    Ok(u.to_toml())
}

/// Launches an instance from the pristine image with the demo's user data.
pub async fn launch(
    world: &World,
    name: &str,
    zone: &str,
    user_data: &str,
) -> Result<(SimInstance, String), String> {
    let i = world
        .launch(InstanceSpec::new(name, zone).user_data(user_data))
        .await
        .map_err(e)?;
    let detail = format!("{} running", i.id);
    Ok((i, detail))
}

/// Waits for the instance's ready line and reports it.
pub async fn ready(i: &SimInstance) -> Result<ConsoleLine, String> {
    i.wait_ready(BOOT).await.map_err(e)
}

/// Notice → drained and detached; EC2 then takes the instance. Returns the notice instant and
/// the detach line.
pub async fn interrupt(
    i: &SimInstance,
    volume_id: &str,
) -> Result<((Instant, ConsoleLine), String), String> {
    let mut c = i.console_from_now();
    let notice = Instant::now();
    i.post_spot_notice(Duration::from_secs(120));
    let detached = c
        .wait_for(&format!("volume: {volume_id} detached in"), STEP)
        .await
        .map_err(e)?;
    c.wait_for("shutdown: done in", STEP).await.map_err(e)?;
    let after = (i.instant_of(&detached) - notice).as_secs_f64();
    if after >= 120.0 {
        return Err(format!(
            "the volume was detached {after:.1} s after the notice: past the 2-minute deadline"
        ));
    }
    i.reclaim().await.map_err(e)?;
    Ok((
        (notice, detached),
        format!(
            "drained, {volume_id} detached {after:.1} s after the notice ({:.1} s before the deadline); EC2 took {}",
            120.0 - after,
            i.id
        ),
    ))
}

/// The counter on `i` must come back by itself with `want`; then one increment.
pub async fn same_count(i: &SimInstance, want: u64) -> Result<(u64, String), String> {
    let counter = Counter {
        port: i.service_port().map_err(e)?,
    };
    let got = counter.wait_value(STEP).await.map_err(e)?;
    if got != want {
        return Err(format!("the counter is {got}, expected {want}"));
    }
    let next = counter.increment().await.map_err(e)?;
    if next != want + 1 {
        return Err(format!("an increment gave {next}, expected {}", want + 1));
    }
    Ok((
        next,
        format!("the container came back by itself with count={got}; incremented to {next}"),
    ))
}
