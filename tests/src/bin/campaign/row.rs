//! One world and its row of runs: the lineage of state, the instances launched into it, and
//! the steps runs are made of (launch, deploy, serve, kill, retire, drain).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use spotworld::docker::{deploy_counter, Counter};
use spotworld::world::{InstanceSpec, SimInstance, UserData, World, WorldSettings, READY_MARKER};

use crate::console::outcome;
use crate::kinds::Kind;
use crate::writer::Writer;
use crate::{e, realistic_timings, Outcome, BOOT, RACER_RETRY_SECS, STEP, ZONES};

pub struct Lineage {
    /// The volumes' Name tag.
    pub name: String,
    /// The counter runs on it: its state must come back.
    pub counter: bool,
}

pub struct Row {
    pub kind: Kind,
    t0: Instant,
    // Before the world: instances drop (their VMs killed) before moto stops.
    pub instances: Vec<SimInstance>,
    pub writer: Writer,
    pub world: World,
    pub lineage: Lineage,
    lineages: usize,
    /// Instance id → its lineage's name.
    pub lineage_of: HashMap<String, String>,
    /// Instance id → when it was killed or EC2 took it.
    pub gone_at: HashMap<String, Instant>,
    /// The instance serving the state, between runs.
    pub holder: Option<usize>,
    pub zone: String,
    launched: usize,
    pub attach_overlaps_seen: BTreeSet<(String, String, String)>,
    pub mount_overlaps_seen: BTreeSet<(String, String, String)>,
}

impl Row {
    pub async fn start(kind: Kind, t0: Instant) -> Outcome<Row> {
        let mut settings = WorldSettings::new(&format!("campaign-{}", kind.slug()));
        settings.fidelity = realistic_timings();
        let world = World::start(settings).await.map_err(e)?;
        let mut row = Row {
            kind,
            t0,
            instances: Vec::new(),
            writer: Writer::start(),
            world,
            lineage: Lineage {
                name: String::new(),
                counter: false,
            },
            lineages: 0,
            lineage_of: HashMap::new(),
            gone_at: HashMap::new(),
            holder: None,
            zone: ZONES[0].to_owned(),
            launched: 0,
            attach_overlaps_seen: BTreeSet::new(),
            mount_overlaps_seen: BTreeSet::new(),
        };
        row.say(&format!(
            "{}: world up ({}), files in {}",
            kind.name(),
            row.world.image().version_line(),
            row.world.dir().display()
        ));
        row.new_lineage();
        let first = row.launch("a", &row.zone.clone(), true).await?;
        let ready = outcome(&row.instances[first], BOOT).await?;
        if !ready.text.contains(READY_MARKER) {
            return Err(format!("the first instance failed: {}", ready.text));
        }
        row.deploy_counter(first).await?;
        row.serve_from(first)?;
        row.say(&format!(
            "lineage {}: the counter serves on {}",
            row.lineage.name, row.instances[first].id
        ));
        Ok(row)
    }

    pub fn say(&self, text: &str) {
        println!("[{:>7.1} s] {text}", self.t0.elapsed().as_secs_f64());
    }

    /// A fresh Name tag: the next instance creates its volume.
    pub fn new_lineage(&mut self) {
        self.lineages += 1;
        self.lineage = Lineage {
            name: format!("campaign-{}-{}", self.kind.slug(), self.lineages),
            counter: false,
        };
    }

    /// Small user data; the Engine API only where the counter is deployed.
    fn user_data(&self, docker_api: bool) -> UserData {
        let mut u = UserData::new(&self.lineage.name);
        u.docker_api = docker_api;
        u
    }

    fn register(&mut self, i: SimInstance) -> usize {
        self.lineage_of
            .insert(i.id.clone(), self.lineage.name.clone());
        self.instances.push(i);
        self.instances.len() - 1
    }

    pub async fn launch(&mut self, role: &str, zone: &str, docker_api: bool) -> Outcome<usize> {
        self.launched += 1;
        let name = format!("{role}{:02}", self.launched);
        let spec = InstanceSpec::new(&name, zone).user_data(self.user_data(docker_api).to_toml());
        let i = self.world.launch(spec).await.map_err(e)?;
        Ok(self.register(i))
    }

    /// Two instances at once (racers), each in its zone; they give up soon.
    pub async fn launch_pair(&mut self, zones: [&str; 2]) -> Outcome<[usize; 2]> {
        self.launched += 1;
        let mut u = self.user_data(false);
        u.retry_for_secs = RACER_RETRY_SECS;
        let spec = |suffix: &str, zone: &str| {
            InstanceSpec::new(&format!("r{:02}{suffix}", self.launched), zone)
                .user_data(u.to_toml())
        };
        let (x, y) = tokio::join!(
            self.world.launch(spec("a", zones[0])),
            self.world.launch(spec("b", zones[1]))
        );
        let (x, y) = (x.map_err(e)?, y.map_err(e)?);
        Ok([self.register(x), self.register(y)])
    }

    pub async fn deploy_counter(&mut self, idx: usize) -> Outcome<()> {
        let i = &self.instances[idx];
        let docker = i.docker().map_err(e)?;
        docker.wait_ping(STEP).await.map_err(e)?;
        deploy_counter(&docker).await.map_err(e)?;
        let counter = Counter {
            port: i.service_port().map_err(e)?,
        };
        let v = counter.wait_value(STEP).await.map_err(e)?;
        if v != 0 {
            return Err(format!("a new counter on {} starts at {v}", i.id));
        }
        self.writer.new_count();
        self.lineage.counter = true;
        Ok(())
    }

    /// `idx` holds the state now: the writer goes on against it.
    pub fn serve_from(&mut self, idx: usize) -> Outcome<()> {
        if self.lineage.counter {
            self.writer
                .point_at(self.instances[idx].service_port().map_err(e)?);
        }
        self.holder = Some(idx);
        self.zone = self.instances[idx].zone.clone();
        Ok(())
    }

    /// SIGKILL, then EC2 terminates it. Returns the instant of the kill.
    pub async fn kill(&mut self, idx: usize) -> Outcome<Instant> {
        let at = Instant::now();
        let i = &self.instances[idx];
        self.gone_at.insert(i.id.clone(), at);
        i.kill_hard().await.map_err(e)?;
        Ok(at)
    }

    /// The holder lets go the clean way (the power button: the drain), and EC2 takes it.
    pub async fn retire(&mut self, idx: usize) -> Outcome<()> {
        let i = &self.instances[idx];
        let mut c = i.console_from_now();
        i.powerdown().await.map_err(e)?;
        c.wait_for("spotinit: powering off", STEP)
            .await
            .map_err(e)?;
        i.wait_poweroff(STEP).await.map_err(e)?;
        self.kill(idx).await.map(drop)
    }

    /// A two-minute spot notice; returns its instant once the holder has drained, then EC2
    /// takes it.
    pub async fn notice_and_drain(&mut self, idx: usize) -> Outcome<Instant> {
        let i = &self.instances[idx];
        let mut c = i.console_from_now();
        let at = Instant::now();
        i.post_spot_notice(Duration::from_secs(120));
        c.wait_for("drained; waiting for EC2", STEP)
            .await
            .map_err(e)?;
        self.kill(idx).await?;
        Ok(at)
    }
}
