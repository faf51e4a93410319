//! The narrated scenario: A creates the state, B inherits it after a notice, C after a hard kill
//! of B, D in another zone through a snapshot.

use std::time::Instant;

use spotworld::docker::Counter;
use spotworld::qemu::ConsoleLine;
use spotworld::world::{SimInstance, World};

use crate::bench::Marks;
use crate::console::{after_spotinit, find, wait};
use crate::narrator::Demo;
use crate::steps::{interrupt, launch, ready, same_count};
use crate::{e, BOOT, STEP};

/// The steps; stops at the first failure. Returns 0 if every step passed.
pub async fn scenario(
    d: &mut Demo,
    world: &World,
    user_data: &str,
    instances: &mut Vec<SimInstance>,
    marks: &mut Marks,
) -> i32 {
    // A: first boot, creates the volume.
    let Some(a) = d
        .step(
            "launch instance A in us-east-1a (pristine image)",
            launch(world, "A", "us-east-1a", user_data),
        )
        .await
    else {
        return 1;
    };
    d.narrate(&a);
    instances.push(a);
    let a = &instances[0];
    let Some(volume_id) = d
        .step(
            "A boots: creates, formats and mounts the state volume",
            async {
                let r = ready(a).await?;
                let created = find(a, "volume: created vol-").ok_or("A did not create a volume")?;
                find(a, "creating ext4").ok_or("A did not format the volume")?;
                let id = created
                    .text
                    .split("volume: created ")
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                Ok((
                    id.clone(),
                    format!("{id} created and formatted; {}", after_spotinit(&r)),
                ))
            },
        )
        .await
    else {
        return 1;
    };
    if d.step(
        "A pulls and starts the declared counter (from the user data, no API call)",
        async {
            let pulled = wait(a, "containers: pulled ", STEP).await?;
            let all = wait(a, "containers: all 1 declared running", STEP).await?;
            let tail = |l: &ConsoleLine, after: &str| {
                l.text.split(after).nth(1).unwrap_or("").trim().to_owned()
            };
            Ok((
                (),
                format!(
                    "pulled {}; running {}",
                    tail(&pulled, "containers: pulled "),
                    tail(&all, "declared running, ")
                ),
            ))
        },
    )
    .await
    .is_none()
    {
        return 1;
    }
    if d.step("increment the counter on A three times", async {
        let counter = Counter {
            port: a.service_port().map_err(e)?,
        };
        counter.wait_value(STEP).await.map_err(e)?;
        let mut v = 0;
        for _ in 0..3 {
            v = counter.increment().await.map_err(e)?;
        }
        if v != 3 {
            return Err(format!("the counter is {v}, expected 3"));
        }
        Ok((
            (),
            "count=3, each increment fsync'ed before the answer".into(),
        ))
    })
    .await
    .is_none()
    {
        return 1;
    }
    let Some(m) = d
        .step(
            "spot interruption notice on A (2 minutes)",
            interrupt(a, &volume_id),
        )
        .await
    else {
        return 1;
    };
    marks.notice_a = Some(m);

    // B: same zone, the container comes back by itself.
    let Some(b) = d
        .step(
            "launch instance B in us-east-1a (pristine image)",
            launch(world, "B", "us-east-1a", user_data),
        )
        .await
    else {
        return 1;
    };
    d.narrate(&b);
    instances.push(b);
    let b = &instances[1];
    if d.step("B boots on the same volume", async {
        let r = ready(b).await?;
        find(b, &format!("volume: found {volume_id}")).ok_or("B did not find the volume")?;
        if find(b, "creating ext4").is_some() {
            return Err("B formatted the volume".into());
        }
        Ok((
            (),
            format!(
                "found {volume_id}, filesystem clean; {}",
                after_spotinit(&r)
            ),
        ))
    })
    .await
    .is_none()
    {
        return 1;
    }
    if d.step("same counter on B", same_count(b, 3))
        .await
        .is_none()
    {
        return 1;
    }

    // Hard kill of B; C waits for the release.
    marks.kill_b = Some(Instant::now());
    if d.step(
        "kill B without warning (SIGKILL, EC2 terminates it)",
        async {
            b.kill_hard().await.map_err(e)?;
            Ok((
                (),
                format!("{} gone; EC2 holds {volume_id} for a while", b.id),
            ))
        },
    )
    .await
    .is_none()
    {
        return 1;
    }
    let Some(c) = d
        .step(
            "launch instance C in us-east-1a (pristine image)",
            launch(world, "C", "us-east-1a", user_data),
        )
        .await
    else {
        return 1;
    };
    d.narrate(&c);
    instances.push(c);
    let c = &instances[2];
    if d.step(
        "C waits for the release, checks the filesystem, boots",
        async {
            let released = wait(c, &format!("volume: {volume_id} released after"), BOOT).await?;
            let checked = wait(c, "volume: filesystem ", STEP).await?;
            let r = ready(c).await?;
            let how = checked
                .text
                .split("volume: filesystem ")
                .nth(1)
                .unwrap_or("")
                .to_owned();
            let rel = released.text.split(" released after ").nth(1).unwrap_or("");
            Ok((
                (),
                format!(
                    "released after {rel}, filesystem {how}; {}",
                    after_spotinit(&r)
                ),
            ))
        },
    )
    .await
    .is_none()
    {
        return 1;
    }
    if d.step("same counter on C", same_count(c, 4))
        .await
        .is_none()
    {
        return 1;
    }

    // C is interrupted; D in another zone.
    let Some(m) = d
        .step("spot interruption notice on C", interrupt(c, &volume_id))
        .await
    else {
        return 1;
    };
    marks.notice_c = Some(m);
    let Some(dd) = d
        .step(
            "launch instance D in us-east-1b (another zone)",
            launch(world, "D", "us-east-1b", user_data),
        )
        .await
    else {
        return 1;
    };
    d.narrate(&dd);
    instances.push(dd);
    let dd = &instances[3];
    if d.step(
        "D moves the volume into us-east-1b through a snapshot",
        async {
            let moved = wait(dd, &format!("volume: {volume_id} now continues as "), BOOT).await?;
            let r = ready(dd).await?;
            let new = moved
                .text
                .split(" now continues as ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("?")
                .to_owned();
            let v = world.volume(&new).await.map_err(e)?;
            if v.zone != "us-east-1b" {
                return Err(format!("{new} is in {}, not us-east-1b", v.zone));
            }
            Ok((
                (),
                format!(
                    "{volume_id} (us-east-1a) → snapshot → {new} (us-east-1b); {}",
                    after_spotinit(&r)
                ),
            ))
        },
    )
    .await
    .is_none()
    {
        return 1;
    }
    if d.step("same counter on D", same_count(dd, 5))
        .await
        .is_none()
    {
        return 1;
    }
    0
}
