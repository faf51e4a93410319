//! The checks after each run: the root Docker started on and the count it serves, attachments
//! and mounts that overlapped, forks of the state.

use std::collections::BTreeSet;
use std::time::Instant;

use spotworld::docker::Counter;

use crate::console::{ends_mount, mounted_volume, BootFacts, Mount};
use crate::report::RunResult;
use crate::row::Row;
use crate::{e, Outcome, STEP};

impl Row {
    /// The highest boot count written by the lineage's instances, `except` those being judged.
    fn lineage_boots(&self, except: &[usize]) -> u64 {
        self.instances
            .iter()
            .enumerate()
            .filter(|(k, i)| {
                !except.contains(k) && self.lineage_of.get(&i.id) == Some(&self.lineage.name)
            })
            .filter_map(|(_, i)| BootFacts::of(i).wrote_boot())
            .max()
            .unwrap_or(0)
    }

    /// The checks on instances that reached ready after a failure: the root Docker started on,
    /// and the count it serves against `acked`.
    pub async fn judge(&mut self, r: &mut RunResult, successors: &[usize], acked: u64) {
        let prior = self.lineage_boots(successors);
        for &s in successors {
            let i = &self.instances[s];
            let f = BootFacts::of(i);
            if !f.ready {
                continue;
            }
            if prior > 0 {
                if f.formatted {
                    r.wrong_root.push(format!(
                        "{} formatted the volume of a lineage at boot {prior}",
                        i.name
                    ));
                }
                match (f.mounted.is_some(), f.record) {
                    (true, None) => r.wrong_root.push(format!(
                        "{} started a new record on a lineage at boot {prior}",
                        i.name
                    )),
                    (_, Some(n)) if n <= prior => r.wrong_root.push(format!(
                        "{} says boot {n} of this state, the lineage was at boot {prior}",
                        i.name
                    )),
                    _ => {}
                }
            }
            if !self.lineage.counter {
                continue;
            }
            let port = match i.service_port() {
                Ok(p) => p,
                Err(x) => {
                    r.notes.push(x.to_string());
                    continue;
                }
            };
            match (Counter { port }).wait_value(STEP).await {
                Ok(v) => {
                    r.served = Some(r.served.map_or(v, |w: u64| w.min(v)));
                    if v < acked {
                        r.lost = r.lost.max(acked - v);
                        r.wrong_root
                            .push(format!("{} serves {v}, {acked} were acknowledged", i.name));
                    } else if v > acked + 1 {
                        r.notes.push(format!(
                            "{} serves {v}, more than the {acked} acknowledged and one in flight",
                            i.name
                        ));
                    }
                }
                Err(x) => {
                    // Docker up, the state's container not: the writes are not served.
                    r.lost = r.lost.max(acked);
                    r.wrong_root.push(format!(
                        "{}: the counter never came back although the lineage had it ({})",
                        i.name,
                        x.message().lines().next().unwrap_or("")
                    ));
                }
            }
        }
    }

    /// Overlapping attachments of one volume in the fidelity layer's history, not seen before.
    pub fn new_attach_overlaps(&mut self) -> Vec<String> {
        let history = self.world.fidelity().attachment_history();
        let now = Instant::now();
        let mut found = Vec::new();
        for (k, a) in history.iter().enumerate() {
            for b in &history[k + 1..] {
                if a.volume == b.volume && a.instance != b.instance && a.overlaps(b, now) {
                    let key = (a.volume.clone(), a.instance.clone(), b.instance.clone());
                    if self.attach_overlaps_seen.insert(key) {
                        found.push(format!(
                            "{} attached to {} and {} at once",
                            a.volume, a.instance, b.instance
                        ));
                    }
                }
            }
        }
        found
    }

    /// Every mount of a state volume on every console, in host time: from `mounted` to the
    /// unmount, the power-off, or the kill.
    fn mounts(&self) -> Vec<Mount> {
        let mut all = Vec::new();
        for i in &self.instances {
            let mut open: Vec<(String, Instant)> = Vec::new();
            for l in i.console().lines() {
                if let Some(v) = mounted_volume(&l.text) {
                    open.push((v, i.instant_of(&l)));
                } else if ends_mount(&l.text) {
                    let at = i.instant_of(&l);
                    all.extend(open.drain(..).map(|(volume, from)| Mount {
                        volume,
                        instance: i.id.clone(),
                        from,
                        until: Some(at),
                    }));
                }
            }
            let end = self.gone_at.get(&i.id).copied();
            all.extend(open.into_iter().map(|(volume, from)| Mount {
                volume,
                instance: i.id.clone(),
                from,
                until: end,
            }));
        }
        all
    }

    pub fn new_mount_overlaps(&mut self) -> Vec<String> {
        let mounts = self.mounts();
        let now = Instant::now();
        let mut found = Vec::new();
        for (k, a) in mounts.iter().enumerate() {
            for b in &mounts[k + 1..] {
                if a.volume == b.volume && a.instance != b.instance && a.overlaps(b, now) {
                    let key = (a.volume.clone(), a.instance.clone(), b.instance.clone());
                    if self.mount_overlaps_seen.insert(key) {
                        found.push(format!(
                            "{} mounted by {} and {} at once",
                            a.volume, a.instance, b.instance
                        ));
                    }
                }
            }
        }
        found
    }

    /// More than one live volume of the lineage that an instance reached ready on.
    pub async fn forks(&self) -> Outcome<Vec<String>> {
        let served_from: BTreeSet<String> = self
            .instances
            .iter()
            .map(BootFacts::of)
            .filter(|f| f.ready)
            .filter_map(|f| f.mounted)
            .collect();
        let live: Vec<String> = self
            .world
            .volumes()
            .await
            .map_err(e)?
            .into_iter()
            .filter(|v| {
                v.tags.get("Name") == Some(&self.lineage.name)
                    && !v.tags.contains_key("spotinit:superseded-by")
                    && v.state != "deleted"
                    && v.state != "deleting"
                    && served_from.contains(&v.id)
            })
            .map(|v| format!("{} ({}, {})", v.id, v.zone, v.state))
            .collect();
        Ok(if live.len() > 1 {
            vec![format!("live copies {}", live.join(", "))]
        } else {
            Vec::new()
        })
    }
}
