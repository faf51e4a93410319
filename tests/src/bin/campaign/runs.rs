//! The runs: a hard kill at a moment, a spot notice, a race, a zone move; each ends with the
//! state served from its successor.

use std::time::{Duration, Instant, SystemTime};

use spotworld::fidelity::Fault;
use spotworld::qemu::ConsoleLine;
use spotworld::world::{BOOT_FAILED_MARKER, READY_MARKER};

use crate::console::{last_volume_line, outcome, spotinit_text, BootFacts};
use crate::kinds::{Kind, Moment};
use crate::report::RunResult;
use crate::row::Row;
use crate::{e, Outcome, BOOT, FAULTY_ACTIONS, FRESH_WRITES, STEP, ZONES};

/// A random duration in [lo, hi) (std's randomly seeded hasher; enough to spread kill moments).
fn random_between(lo: Duration, hi: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    lo + (hi - lo).mul_f64(unit)
}

impl Row {
    pub async fn run(&mut self, number: usize, of: usize) -> RunResult {
        let moment = Moment::CYCLE[(number - 1) % Moment::CYCLE.len()];
        let label = match self.kind {
            Kind::Kill => moment.label(),
            Kind::Graceful => "notice",
            Kind::Race => "two at once",
            Kind::Move if number == of => "two zones",
            Kind::Move => "one zone",
        };
        let mut r = RunResult::new(self.kind, number, label);
        self.say(&format!("{} {number}/{of}: {label}", self.kind.name()));
        let Some(holder) = self.holder.take() else {
            r.failure = Some("not run: the previous run left no instance holding the state".into());
            return r;
        };
        // Something to lose: the state moves on under the holder before every failure.
        let writing = self.writer.wait_for_writes(FRESH_WRITES, STEP).await;
        let done = match writing {
            Err(x) => Err(x),
            Ok(()) => self.one_run(&mut r, holder, moment, number == of).await,
        };
        if let Err(x) = done {
            r.failure = Some(x);
            self.holder = None;
            self.writer.pause().await;
        }
        r.attached_twice = self.new_attach_overlaps();
        r.mounted_twice = self.new_mount_overlaps();
        match self.forks().await {
            Ok(f) => r.forks = f,
            Err(x) => r.notes.push(format!("could not look for forks: {x}")),
        }
        r
    }

    async fn one_run(
        &mut self,
        r: &mut RunResult,
        holder: usize,
        moment: Moment,
        last: bool,
    ) -> Outcome<()> {
        match self.kind {
            Kind::Kill => self.kill_run(r, holder, moment).await,
            Kind::Graceful => self.graceful_run(r, holder).await,
            Kind::Race => {
                let zone = self.zone.clone();
                self.race_run(r, holder, [&zone, &zone]).await
            }
            Kind::Move if last => {
                let others: Vec<&str> = ZONES.iter().copied().filter(|z| *z != self.zone).collect();
                self.race_run(r, holder, [others[0], others[1]]).await
            }
            Kind::Move => self.move_run(r, holder).await,
        }
    }

    async fn kill_run(&mut self, r: &mut RunResult, holder: usize, moment: Moment) -> Outcome<()> {
        let killed_at = if moment.in_boot() {
            // The holder lets go; a new instance boots and is killed at the moment.
            self.writer.pause().await;
            self.retire(holder).await?;
            if moment == Moment::FirstMkfs {
                self.new_lineage();
                self.say(&format!(
                    "new lineage {} for the first mkfs",
                    self.lineage.name
                ));
            }
            r.acked = Some(if self.lineage.counter {
                self.writer.acked()
            } else {
                0
            });
            let zone = self.zone.clone();
            let v = self.launch("v", &zone, false).await?;
            let hit = self.instances[v]
                .console()
                .wait_until(
                    moment.label(),
                    |t| {
                        moment.is_marker(t)
                            || t.contains(READY_MARKER)
                            || t.contains(BOOT_FAILED_MARKER)
                    },
                    BOOT,
                )
                .await
                .map_err(e)?;
            if moment == Moment::Attaching && moment.is_marker(&hit.text) {
                // The line comes just before AttachVolume: strike inside EC2's 3 s of attaching.
                tokio::time::sleep(random_between(
                    Duration::from_millis(200),
                    Duration::from_millis(2500),
                ))
                .await;
            }
            let at = self.kill(v).await?;
            if !moment.is_marker(&hit.text) {
                return Err(format!(
                    "{} never reached the moment ({}): {}",
                    self.instances[v].name,
                    moment.label(),
                    hit.text
                ));
            }
            r.notes.push(format!(
                "{} killed at \"{}\"; its last volume line: \"{}\"",
                self.instances[v].name,
                spotinit_text(&hit),
                last_volume_line(&self.instances[v])
            ));
            at
        } else {
            let h = &self.instances[holder];
            if moment == Moment::MidDrain {
                let mut c = h.console_from_now();
                h.post_spot_notice(Duration::from_secs(120));
                c.wait_for("spotinit: shutting down", STEP)
                    .await
                    .map_err(e)?;
                tokio::time::sleep(random_between(Duration::ZERO, Duration::from_secs(3))).await;
            } else {
                tokio::time::sleep(random_between(
                    Duration::from_secs(2),
                    Duration::from_secs(10),
                ))
                .await;
            }
            let at = self.kill(holder).await?;
            // An answer already on its way before the kill still counts.
            self.writer.pause().await;
            r.acked = Some(self.writer.acked());
            r.notes.push(format!(
                "{} killed; its last volume line: \"{}\"",
                self.instances[holder].name,
                last_volume_line(&self.instances[holder])
            ));
            at
        };
        let zone = self.zone.clone();
        let fresh_lineage = !self.lineage.counter;
        let s = self.launch("s", &zone, fresh_lineage).await?;
        self.successor_ready(r, s, killed_at).await?;
        let acked = r.acked.unwrap_or(0);
        self.judge(r, &[s], acked).await;
        if fresh_lineage {
            self.deploy_counter(s).await?;
            r.served = Some(0);
        }
        self.serve_from(s)
    }

    async fn graceful_run(&mut self, r: &mut RunResult, holder: usize) -> Outcome<()> {
        let notice = self.notice_and_drain(holder).await?;
        self.writer.pause().await;
        r.acked = Some(self.writer.acked());
        let zone = self.zone.clone();
        let s = self.launch("s", &zone, false).await?;
        self.successor_ready(r, s, notice).await?;
        let acked = r.acked.unwrap_or(0);
        self.judge(r, &[s], acked).await;
        self.serve_from(s)
    }

    async fn move_run(&mut self, r: &mut RunResult, holder: usize) -> Outcome<()> {
        let notice = self.notice_and_drain(holder).await?;
        self.writer.pause().await;
        r.acked = Some(self.writer.acked());
        let here = ZONES.iter().position(|z| *z == self.zone).unwrap_or(0);
        let there = ZONES[(here + 1) % ZONES.len()];
        let s = self.launch("m", there, false).await?;
        self.successor_ready(r, s, notice).await?;
        let acked = r.acked.unwrap_or(0);
        self.judge(r, &[s], acked).await;
        if !self.instances[s].console().contains(" now continues as ") {
            r.notes.push(format!(
                "{} did not say it moved the volume into {there}",
                self.instances[s].name
            ));
        }
        self.serve_from(s)
    }

    /// The holder drains; two instances boot at once (in `zones`; a throttling EC2 when both
    /// are in the holder's zone). One must reach ready, the other fail closed and power off.
    async fn race_run(
        &mut self,
        r: &mut RunResult,
        holder: usize,
        zones: [&str; 2],
    ) -> Outcome<()> {
        let notice = self.notice_and_drain(holder).await?;
        self.writer.pause().await;
        r.acked = Some(self.writer.acked());
        let from_zone = self.zone.clone();
        let throttled = self.kind == Kind::Race;
        if throttled {
            let f = self.world.fidelity();
            for action in FAULTY_ACTIONS {
                f.inject_rate(action, Fault::Throttle, 0.20);
                f.inject_rate(action, Fault::ServerError, 0.02);
            }
        }
        let pair = self.launch_pair(zones).await;
        let decided = match &pair {
            Ok([a, b]) => {
                let (x, y) = tokio::join!(
                    outcome(&self.instances[*a], BOOT),
                    outcome(&self.instances[*b], BOOT)
                );
                Ok((x, y))
            }
            Err(x) => Err(x.clone()),
        };
        if throttled {
            self.world.fidelity().clear_fault_rates();
        }
        let [a, b] = pair?;
        let (x, y) = decided?;
        let (x, y) = (x?, y?);
        let ready = |l: &ConsoleLine| l.text.contains(READY_MARKER);
        let (winner, loser) = match (ready(&x), ready(&y)) {
            (true, false) => (a, b),
            (false, true) => (b, a),
            (both, _) => {
                // Judged all the same: two instances serving one state is what is measured.
                let acked = r.acked.unwrap_or(0);
                self.judge(r, &[a, b], acked).await;
                return Err(format!(
                    "{}: {} and {} reached ready",
                    if both { "both" } else { "neither" },
                    self.instances[a].name,
                    self.instances[b].name
                ));
            }
        };
        let ready_line = if winner == a { x } else { y };
        r.recovery = Some(
            self.instances[winner]
                .instant_of(&ready_line)
                .saturating_duration_since(notice),
        );
        let acked = r.acked.unwrap_or(0);
        self.judge(r, &[winner], acked).await;
        let w = &self.instances[winner];
        if w.zone != from_zone && !w.console().contains(" now continues as ") {
            r.notes.push(format!(
                "{} did not say it moved the volume into {}",
                w.name, w.zone
            ));
        }
        let l = &self.instances[loser];
        if BootFacts::of(l).docker_started {
            r.wrong_root
                .push(format!("{}, the losing racer, started Docker", l.name));
        }
        l.console()
            .wait_for("Docker was not started", STEP)
            .await
            .map_err(e)?;
        if !l.wait_poweroff(STEP).await.map_err(e)? {
            r.notes
                .push(format!("{} powered off with a failure status", l.name));
        }
        let why = l
            .console()
            .lines()
            .into_iter()
            .find(|x| x.text.contains(BOOT_FAILED_MARKER))
            .map(|x| spotinit_text(&x).chars().take(160).collect::<String>())
            .unwrap_or_default();
        r.notes.push(format!(
            "{} won in {}; {} failed closed: \"{why}…\"",
            self.instances[winner].name, self.instances[winner].zone, l.name
        ));
        self.kill(loser).await?;
        self.serve_from(winner)
    }

    /// Waits for the successor's ready line; the recovery time counts from `since`.
    async fn successor_ready(&self, r: &mut RunResult, s: usize, since: Instant) -> Outcome<()> {
        let i = &self.instances[s];
        let line = outcome(i, BOOT).await?;
        if !line.text.contains(READY_MARKER) {
            return Err(format!(
                "the successor {} failed to boot: {}",
                i.name,
                spotinit_text(&line)
            ));
        }
        r.recovery = Some(i.instant_of(&line).saturating_duration_since(since));
        Ok(())
    }
}
