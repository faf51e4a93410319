//! Benchmark of the promise "the state survives": a campaign of instance losses against the
//! world in a box, with EC2's timings (attach 3 s, detach 2 s, release 20 s after a
//! termination, snapshot 10 s, volume creation 2 s), and a table of what was lost.
//!
//! A counter service (it fsyncs before it answers) holds the state. A writer task increments it a
//! few times a second against whichever instance serves it and keeps the highest value
//! acknowledged; every loss is measured against that. One world per kind of run; one lineage of
//! state per world (a Name tag), each run's successor the next run's holder:
//!
//! - **hard kill** (`--kills`, 20): QEMU SIGKILLed, then EC2 terminates the instance and holds its
//!   volume 20 s. The moments cycle: before attach (a booting instance's "volume: found"), while
//!   attaching (0.2-2.5 s after "volume: attaching", inside EC2's attach latency), during the
//!   first mkfs (a new lineage), during fsck ("checking it"), under writes (2-10 s after the
//!   counter serves), in the middle of a drain (0-3 s after "shutting down"). For the boot
//!   moments the holder first lets go through the power button and a new instance is the victim.
//!   The successor boots in the same zone. Every run first waits for a few fresh acknowledged
//!   writes, so each failure has something to lose.
//! - **spot notice** (`--graceful`, 10): a two-minute notice under writes; the drain; the successor.
//! - **race** (`--races`, 10): the holder drains, two instances boot at once in its zone while
//!   EC2 throttles 20 % and fails 2 % of the volume calls: exactly one may reach ready, the other
//!   must fail closed (BOOT FAILED, Docker never started) and power off.
//! - **zone move** (`--moves`, 3): the holder drains and the successor boots in another zone (a
//!   snapshot and a copy); the last move is two instances in the two other zones at once: one
//!   wins, the other fails closed.
//!
//! Measured per run, from the successor and from outside: acknowledged writes lost (highest
//! acknowledged minus what the successor serves); Docker started on a wrong, stale or empty root
//! (a lower count, no counter although the lineage had one, a record line `boot N` not above
//! every earlier boot of the lineage, a mkfs or a new record on a lineage with state, a losing
//! racer that started Docker); the volume attached twice (overlapping attachments in the
//! fidelity layer's history) or mounted twice (overlapping "volume: <id> mounted" to
//! unmount/kill/power-off intervals on two consoles); state forks (more than one live,
//! unsuperseded volume of the lineage that an instance reached ready on); the worst time from the
//! kill (or the notice) to the successor's ready. A run whose expectations could not be checked
//! (a successor that never came up, a race with no single winner) is a failed run.
//!
//! Exit status: 1 if any loss column is non-zero, 3 if only runs failed, 2 for bad arguments.
//! Needs what the end-to-end tests need (the built image, QEMU, moto, busybox-static); under TCG
//! a run takes one to three minutes. Run:
//! `cargo run --release -p spotworld --bin campaign -- [--kills N] [--graceful N] [--races N] [--moves N]`;
//! consoles in `build/test-runs/campaign-<kind>/`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use spotworld::docker::{deploy_counter, Counter};
use spotworld::fidelity::{Fault, Settings};
use spotworld::qemu::ConsoleLine;
use spotworld::world::{
    e2e_settings, InstanceSpec, SimInstance, UserData, World, WorldSettings, BOOT_FAILED_MARKER,
    READY_MARKER,
};
use tokio::sync::watch;

/// Power-on to ready, a release wait and two TCG guests sharing two cores included.
const BOOT: Duration = Duration::from_secs(480);
/// Any one step after a boot: a drain, a power-off, the counter coming back.
const STEP: Duration = Duration::from_secs(180);
const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];
/// The calls spotinit makes about its volume, throttled and failed during races.
const FAULTY_ACTIONS: [&str; 8] = [
    "AttachVolume",
    "DetachVolume",
    "DescribeVolumes",
    "DescribeInstances",
    "CreateTags",
    "CreateVolume",
    "CreateSnapshot",
    "DescribeSnapshots",
];
/// Between two increments of the writer.
const WRITE_PACE: Duration = Duration::from_millis(300);
/// One increment that takes longer is abandoned (never acknowledged).
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Acknowledged writes each run waits for before its failure.
const FRESH_WRITES: u64 = 5;
/// Racers give up soon: they are expected to lose.
const RACER_RETRY_SECS: u64 = 30;

type Outcome<T> = std::result::Result<T, String>;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// EC2 as it paces itself, with a release after a termination at the short end of real life.
fn realistic_timings() -> Settings {
    Settings {
        attach_latency: Duration::from_secs(3),
        detach_latency: Duration::from_secs(2),
        volume_creation: Duration::from_secs(2),
        snapshot_duration: Duration::from_secs(10),
        release_after_termination: Duration::from_secs(20),
        ..e2e_settings()
    }
}

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

// ---------------------------------------------------------------------------------------------
// Options, kinds, moments
// ---------------------------------------------------------------------------------------------

struct Options {
    kills: usize,
    graceful: usize,
    races: usize,
    moves: usize,
}

const USAGE: &str = "usage: campaign [--kills N] [--graceful N] [--races N] [--moves N] \
                     (defaults 20 10 10 3)";

fn parse_options(args: &[String]) -> Outcome<Options> {
    let mut o = Options {
        kills: 20,
        graceful: 10,
        races: 10,
        moves: 3,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--kills" => &mut o.kills,
            "--graceful" => &mut o.graceful,
            "--races" => &mut o.races,
            "--moves" => &mut o.moves,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        };
        *slot = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} wants a count"))?;
    }
    Ok(o)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Kill,
    Graceful,
    Race,
    Move,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Kill, Kind::Graceful, Kind::Race, Kind::Move];

    fn name(self) -> &'static str {
        match self {
            Kind::Kill => "hard kill",
            Kind::Graceful => "spot notice",
            Kind::Race => "race",
            Kind::Move => "zone move",
        }
    }

    /// The world's directory and the lineages' Name tags.
    fn slug(self) -> &'static str {
        match self {
            Kind::Kill => "kills",
            Kind::Graceful => "graceful",
            Kind::Race => "races",
            Kind::Move => "moves",
        }
    }
}

/// When a hard kill strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moment {
    BeforeAttach,
    Attaching,
    FirstMkfs,
    Fsck,
    UnderWrites,
    MidDrain,
}

impl Moment {
    const CYCLE: [Moment; 6] = [
        Moment::BeforeAttach,
        Moment::Attaching,
        Moment::FirstMkfs,
        Moment::Fsck,
        Moment::UnderWrites,
        Moment::MidDrain,
    ];

    fn label(self) -> &'static str {
        match self {
            Moment::BeforeAttach => "before attach",
            Moment::Attaching => "while attaching",
            Moment::FirstMkfs => "first mkfs",
            Moment::Fsck => "during fsck",
            Moment::UnderWrites => "under writes",
            Moment::MidDrain => "mid-drain",
        }
    }

    /// The moments that hit a booting instance rather than the holder.
    fn in_boot(self) -> bool {
        !matches!(self, Moment::UnderWrites | Moment::MidDrain)
    }

    /// The victim's console line to kill on (boot moments).
    fn is_marker(self, text: &str) -> bool {
        match self {
            Moment::BeforeAttach => {
                text.contains("spotinit: volume: found ")
                    || text.contains("spotinit: volume: using ")
            }
            Moment::Attaching => text.contains("spotinit: volume: attaching "),
            Moment::FirstMkfs => text.contains("creating ext4"),
            Moment::Fsck => text.contains("; checking it"),
            Moment::UnderWrites | Moment::MidDrain => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------------

/// Increments the counter a few times a second against the port it is pointed at and keeps the
/// highest value acknowledged; errors (an instance dying under it) are expected and ignored.
struct Writer {
    target: watch::Sender<Option<u16>>,
    acked: Arc<AtomicU64>,
    /// Held across each increment, so a pause can wait out the one in flight.
    attempt: Arc<tokio::sync::Mutex<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start() -> Writer {
        let (target, mut rx) = watch::channel(None::<u16>);
        let acked = Arc::new(AtomicU64::new(0));
        let attempt = Arc::new(tokio::sync::Mutex::new(()));
        let task = {
            let (acked, attempt) = (acked.clone(), attempt.clone());
            tokio::spawn(async move {
                loop {
                    let Some(port) = *rx.borrow_and_update() else {
                        if rx.changed().await.is_err() {
                            return;
                        }
                        continue;
                    };
                    {
                        let _in_flight = attempt.lock().await;
                        // A pause may have come while waiting for the lock.
                        if *rx.borrow() == Some(port) {
                            let counter = Counter { port };
                            let increment = counter.increment();
                            if let Ok(Ok(v)) = tokio::time::timeout(WRITE_TIMEOUT, increment).await
                            {
                                acked.fetch_max(v, Ordering::SeqCst);
                            }
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(WRITE_PACE) => {}
                        changed = rx.changed() => if changed.is_err() { return },
                    }
                }
            })
        };
        Writer {
            target,
            acked,
            attempt,
            task,
        }
    }

    fn point_at(&self, port: u16) {
        self.target.send_replace(Some(port));
    }

    /// Stops writing; returns once no increment is in flight.
    async fn pause(&self) {
        self.target.send_replace(None);
        drop(self.attempt.lock().await);
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until `n` more writes than now were acknowledged.
    async fn wait_for_writes(&self, n: u64, deadline: Duration) -> Outcome<()> {
        let (want, until) = (self.acked() + n, Instant::now() + deadline);
        while self.acked() < want {
            if Instant::now() > until {
                return Err(format!(
                    "the writer got {} of {n} writes acknowledged in {:.0} s",
                    n + self.acked() - want,
                    deadline.as_secs_f64()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// A new lineage starts its count from zero (call while paused).
    fn new_count(&self) {
        self.acked.store(0, Ordering::SeqCst);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// What a console says
// ---------------------------------------------------------------------------------------------

/// One boot's volume story, from its console.
#[derive(Debug, Default)]
struct BootFacts {
    /// `volume: record: boot N` printed before the volume was mounted.
    record: Option<u64>,
    /// The volume in `volume: <id> mounted` (the record was written durably before it).
    mounted: Option<String>,
    formatted: bool,
    ready: bool,
    docker_started: bool,
}

impl BootFacts {
    fn of(i: &SimInstance) -> BootFacts {
        BootFacts::from_lines(&i.console().lines())
    }

    fn from_lines(lines: &[ConsoleLine]) -> BootFacts {
        let mut f = BootFacts::default();
        for l in lines {
            let t = &l.text;
            if let Some(n) = t
                .split("spotinit: volume: record: boot ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
            {
                f.record.get_or_insert(n);
            } else if let Some(v) = mounted_volume(t) {
                f.mounted.get_or_insert(v);
            } else if t.contains("creating ext4") {
                f.formatted = true;
            } else if t.contains(READY_MARKER) {
                f.ready = true;
            } else if t.contains("spotinit: phase containerd") {
                f.docker_started = true;
            }
        }
        f
    }

    /// The boot count this instance wrote to the state: its record line's, or 1 for a new
    /// record; `None` if it never mounted the volume.
    fn wrote_boot(&self) -> Option<u64> {
        self.mounted.as_ref().map(|_| self.record.unwrap_or(1))
    }
}

/// `vol-…` from spotinit's `volume: <id> mounted; …` line.
fn mounted_volume(text: &str) -> Option<String> {
    let rest = text.split("spotinit: volume: ").nth(1)?;
    let (id, _) = rest.split_once(" mounted; ")?;
    id.starts_with("vol-").then(|| id.to_owned())
}

/// A console line after which the guest no longer has the volume mounted read-write.
fn ends_mount(text: &str) -> bool {
    text.contains("spotinit: volume: unmounted in ")
        || text.contains("so it is detached consistent")
        || text.contains("spotinit: powering off")
        || text.contains("spotinit: rebooting")
}

/// A volume mounted in one guest, in host time.
struct Mount {
    volume: String,
    instance: String,
    from: Instant,
    until: Option<Instant>,
}

impl Mount {
    fn overlaps(&self, other: &Mount, now: Instant) -> bool {
        self.from < other.until.unwrap_or(now) && other.from < self.until.unwrap_or(now)
    }
}

fn spotinit_text(l: &ConsoleLine) -> &str {
    l.text.split("spotinit: ").nth(1).unwrap_or(&l.text)
}

/// The last line spotinit printed about its volume (where a kill found the victim).
fn last_volume_line(i: &SimInstance) -> String {
    i.console()
        .lines()
        .iter()
        .rev()
        .find(|l| l.text.contains("spotinit: volume: "))
        .map(|l| spotinit_text(l).to_owned())
        .unwrap_or_else(|| "(no volume line)".into())
}

/// Ready, or the boot failure, whichever comes first.
async fn outcome(i: &SimInstance, deadline: Duration) -> Outcome<ConsoleLine> {
    i.console()
        .wait_until(
            "ready or BOOT FAILED",
            |t| t.contains(READY_MARKER) || t.contains(BOOT_FAILED_MARKER),
            deadline,
        )
        .await
        .map_err(|x| format!("{} ({}): {x}", i.name, i.id))
}

// ---------------------------------------------------------------------------------------------
// One run's result
// ---------------------------------------------------------------------------------------------

struct RunResult {
    kind: Kind,
    number: usize,
    moment: String,
    acked: Option<u64>,
    served: Option<u64>,
    lost: u64,
    wrong_root: Vec<String>,
    attached_twice: Vec<String>,
    mounted_twice: Vec<String>,
    forks: Vec<String>,
    recovery: Option<Duration>,
    failure: Option<String>,
    notes: Vec<String>,
}

impl RunResult {
    fn new(kind: Kind, number: usize, moment: &str) -> RunResult {
        RunResult {
            kind,
            number,
            moment: moment.to_owned(),
            acked: None,
            served: None,
            lost: 0,
            wrong_root: Vec::new(),
            attached_twice: Vec::new(),
            mounted_twice: Vec::new(),
            forks: Vec::new(),
            recovery: None,
            failure: None,
            notes: Vec::new(),
        }
    }

    fn has_loss(&self) -> bool {
        self.lost > 0
            || !self.wrong_root.is_empty()
            || !self.attached_twice.is_empty()
            || !self.mounted_twice.is_empty()
            || !self.forks.is_empty()
    }

    fn line(&self) -> String {
        let num = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let verdict = if self.has_loss() {
            let mut what: Vec<String> = Vec::new();
            if self.lost > 0 {
                what.push(format!("{} acknowledged writes lost", self.lost));
            }
            for (name, list) in [
                ("wrong root", &self.wrong_root),
                ("attached twice", &self.attached_twice),
                ("mounted twice", &self.mounted_twice),
                ("fork", &self.forks),
            ] {
                what.extend(list.iter().map(|x| format!("{name}: {x}")));
            }
            format!("LOSS: {}", what.join("; "))
        } else if self.failure.is_some() {
            "FAILED".to_string()
        } else {
            "ok".to_string()
        };
        let mut s = format!(
            "{:<11} {:>2}  {:<15}  acked {:>4}  served {:>4}  recovery {:>7}  {verdict}",
            self.kind.name(),
            self.number,
            self.moment,
            num(self.acked),
            num(self.served),
            self.recovery
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
        );
        if let Some(f) = &self.failure {
            s.push_str(&format!("\n      failed: {}", indent(f)));
        }
        for n in &self.notes {
            s.push_str(&format!("\n      {n}"));
        }
        s
    }
}

fn indent(text: &str) -> String {
    text.trim_end().replace('\n', "\n        ")
}

// ---------------------------------------------------------------------------------------------
// One world: a row of runs
// ---------------------------------------------------------------------------------------------

struct Lineage {
    /// The volumes' Name tag.
    name: String,
    /// The counter runs on it: its state must come back.
    counter: bool,
}

struct Row {
    kind: Kind,
    t0: Instant,
    // Before the world: instances drop (their VMs killed) before moto stops.
    instances: Vec<SimInstance>,
    writer: Writer,
    world: World,
    lineage: Lineage,
    lineages: usize,
    /// Instance id → its lineage's name.
    lineage_of: HashMap<String, String>,
    /// Instance id → when it was killed or EC2 took it.
    gone_at: HashMap<String, Instant>,
    /// The instance serving the state, between runs.
    holder: Option<usize>,
    zone: String,
    launched: usize,
    attach_overlaps_seen: BTreeSet<(String, String, String)>,
    mount_overlaps_seen: BTreeSet<(String, String, String)>,
}

impl Row {
    async fn start(kind: Kind, t0: Instant) -> Outcome<Row> {
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

    fn say(&self, text: &str) {
        println!("[{:>7.1} s] {text}", self.t0.elapsed().as_secs_f64());
    }

    /// A fresh Name tag: the next instance creates its volume.
    fn new_lineage(&mut self) {
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

    async fn launch(&mut self, role: &str, zone: &str, docker_api: bool) -> Outcome<usize> {
        self.launched += 1;
        let name = format!("{role}{:02}", self.launched);
        let spec = InstanceSpec::new(&name, zone).user_data(self.user_data(docker_api).to_toml());
        let i = self.world.launch(spec).await.map_err(e)?;
        Ok(self.register(i))
    }

    /// Two instances at once (racers), each in its zone; they give up soon.
    async fn launch_pair(&mut self, zones: [&str; 2]) -> Outcome<[usize; 2]> {
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

    async fn deploy_counter(&mut self, idx: usize) -> Outcome<()> {
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
    fn serve_from(&mut self, idx: usize) -> Outcome<()> {
        if self.lineage.counter {
            self.writer
                .point_at(self.instances[idx].service_port().map_err(e)?);
        }
        self.holder = Some(idx);
        self.zone = self.instances[idx].zone.clone();
        Ok(())
    }

    /// SIGKILL, then EC2 terminates it. Returns the instant of the kill.
    async fn kill(&mut self, idx: usize) -> Outcome<Instant> {
        let at = Instant::now();
        let i = &self.instances[idx];
        self.gone_at.insert(i.id.clone(), at);
        i.kill_hard().await.map_err(e)?;
        Ok(at)
    }

    /// The holder lets go the clean way (the power button: the drain), and EC2 takes it.
    async fn retire(&mut self, idx: usize) -> Outcome<()> {
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
    async fn notice_and_drain(&mut self, idx: usize) -> Outcome<Instant> {
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
    async fn judge(&mut self, r: &mut RunResult, successors: &[usize], acked: u64) {
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
    fn new_attach_overlaps(&mut self) -> Vec<String> {
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

    fn new_mount_overlaps(&mut self) -> Vec<String> {
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
    async fn forks(&self) -> Outcome<Vec<String>> {
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

    // -----------------------------------------------------------------------------------------
    // The runs
    // -----------------------------------------------------------------------------------------

    async fn run(&mut self, number: usize, of: usize) -> RunResult {
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

// ---------------------------------------------------------------------------------------------
// Main: rows, the table
// ---------------------------------------------------------------------------------------------

async fn run_row(kind: Kind, count: usize, t0: Instant) -> Vec<RunResult> {
    let mut results = Vec::new();
    let mut row = match Row::start(kind, t0).await {
        Ok(row) => Some(row),
        Err(x) => {
            eprintln!("campaign: {}: could not set up: {x}", kind.name());
            None
        }
    };
    for number in 1..=count {
        let r = match row.as_mut() {
            Some(row) => row.run(number, count).await,
            None => {
                let mut r = RunResult::new(kind, number, "-");
                r.failure = Some("not run: the world or its first instance failed".into());
                r
            }
        };
        println!("[{:>7.1} s] {}", t0.elapsed().as_secs_f64(), r.line());
        results.push(r);
    }
    results
}

/// One row of the table.
struct Tally {
    name: String,
    runs: usize,
    lost: u64,
    wrong_root: usize,
    attached_twice: usize,
    mounted_twice: usize,
    forks: usize,
    worst: Option<Duration>,
    failed: usize,
}

impl Tally {
    fn of<'a>(name: &str, runs: impl Iterator<Item = &'a RunResult>) -> Tally {
        let mut t = Tally {
            name: name.to_owned(),
            runs: 0,
            lost: 0,
            wrong_root: 0,
            attached_twice: 0,
            mounted_twice: 0,
            forks: 0,
            worst: None,
            failed: 0,
        };
        for r in runs {
            t.runs += 1;
            t.lost += r.lost;
            t.wrong_root += usize::from(!r.wrong_root.is_empty());
            t.attached_twice += usize::from(!r.attached_twice.is_empty());
            t.mounted_twice += usize::from(!r.mounted_twice.is_empty());
            t.forks += usize::from(!r.forks.is_empty());
            t.failed += usize::from(r.failure.is_some());
            t.worst = t.worst.max(r.recovery);
        }
        t
    }

    fn losses(&self) -> bool {
        self.lost > 0
            || self.wrong_root > 0
            || self.attached_twice > 0
            || self.mounted_twice > 0
            || self.forks > 0
    }

    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.name,
            self.runs,
            self.lost,
            self.wrong_root,
            self.attached_twice,
            self.mounted_twice,
            self.forks,
            self.worst
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            self.failed
        )
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_options(&args) {
        Ok(o) => o,
        Err(x) => {
            if !x.is_empty() {
                eprintln!("campaign: {x}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let t0 = Instant::now();
    println!(
        "campaign: does the state survive? {} hard kills, {} spot notices, {} races, {} zone moves",
        opts.kills, opts.graceful, opts.races, opts.moves
    );
    let mut results = Vec::new();
    for kind in Kind::ALL {
        let count = match kind {
            Kind::Kill => opts.kills,
            Kind::Graceful => opts.graceful,
            Kind::Race => opts.races,
            Kind::Move => opts.moves,
        };
        if count > 0 {
            results.extend(run_row(kind, count, t0).await);
        }
    }

    let mut tallies: Vec<Tally> = Kind::ALL
        .iter()
        .map(|k| Tally::of(k.name(), results.iter().filter(|r| r.kind == *k)))
        .collect();
    tallies.push(Tally::of("**total**", results.iter()));
    println!(
        "\n| kind | runs | acknowledged writes lost | Docker on a wrong/stale/empty root | \
         attached twice | mounted twice | state forks | worst time to recovery | failed runs |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for t in &tallies {
        println!("{}", t.row());
    }
    let total = tallies.last().expect("the total row");
    let command: Vec<String> = std::env::args().collect();
    println!("\ncommand: {}", command.join(" "));
    println!(
        "wall time: {:.0} s ({:.1} min); consoles under build/test-runs/campaign-*/",
        t0.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64() / 60.0
    );
    let code = if total.losses() {
        1
    } else if total.failed > 0 {
        3
    } else {
        0
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(texts: &[&str]) -> Vec<ConsoleLine> {
        texts
            .iter()
            .enumerate()
            .map(|(k, t)| ConsoleLine {
                at: Duration::from_secs(k as u64),
                text: (*t).to_owned(),
            })
            .collect()
    }

    // Lines as the image prints them (campaign and e2e consoles).
    const TAKEOVER: &[&str] = &[
        "[   9.367] spotinit: volume: vol-06523948ffa0ae8aa has ext4 'spotinit-state' (1.0 GiB of 1.0 GiB); checking it",
        "[   9.497] spotinit: volume: record: boot 3 of this state, last on i-4686f9990136fd41f (clean shutdown), created by i-463f62f71126d08f7 at 2026-11-29T22:13:54Z",
        "[   9.579] spotinit: volume: vol-06523948ffa0ae8aa mounted; /var/lib/docker and /var/lib/containerd are on it",
        "[  13.327] spotinit: phase containerd: done in 2.07 s",
        "[  21.857] spotinit: ready in 21.86 s since power-on (spotinit's part 19.13 s, its CPU time 180 ms, its memory 9644 kB)",
        "[  23.038] spotinit: volume: unmounted in 34 ms",
    ];

    #[test]
    fn a_takeover_reads_as_boot_three_mounted_and_ready() {
        let f = BootFacts::from_lines(&lines(TAKEOVER));
        assert_eq!(f.record, Some(3));
        assert_eq!(f.mounted.as_deref(), Some("vol-06523948ffa0ae8aa"));
        assert!(f.ready && f.docker_started && !f.formatted);
        assert_eq!(f.wrote_boot(), Some(3));
    }

    #[test]
    fn a_first_boot_writes_boot_one_and_a_killed_mkfs_writes_nothing() {
        let first = BootFacts::from_lines(&lines(&[
            "[  12.761] spotinit: volume: vol-53029a3764494151c is empty (1.0 GiB: first and last MiB all zeros, created by this boot); creating ext4 labelled spotinit-state",
            "[  13.025] spotinit: volume: vol-53029a3764494151c mounted; /var/lib/docker and /var/lib/containerd are on it",
        ]));
        assert!(first.formatted);
        assert_eq!(first.record, None);
        assert_eq!(first.wrote_boot(), Some(1));
        let killed = BootFacts::from_lines(&lines(&[
            "[  11.148] spotinit: volume: vol-c1d8d8b9a79185c24 is empty (1.0 GiB: first and last MiB all zeros, created by this boot); creating ext4 labelled spotinit-state",
        ]));
        assert_eq!(killed.wrote_boot(), None);
    }

    #[test]
    fn mount_lines_and_their_ends() {
        assert_eq!(
            mounted_volume(TAKEOVER[2]).as_deref(),
            Some("vol-06523948ffa0ae8aa")
        );
        assert_eq!(mounted_volume(TAKEOVER[0]), None);
        assert!(ends_mount(TAKEOVER[5]));
        assert!(ends_mount("[  34.230] spotinit: powering off"));
        // Docker's leftovers go first; the volume itself is unmounted later.
        assert!(!ends_mount(
            "spotinit: volume: unmounted 2 mounts left on the state volume: /var/lib/docker/leftover (tmpfs)"
        ));
    }

    #[test]
    fn boot_moments_match_their_lines_only() {
        let found = "spotinit: volume: found vol-1 tagged Name=x in us-east-1 (us-east-1a, 1 GiB gp3, available)";
        assert!(Moment::BeforeAttach.is_marker(found));
        assert!(!Moment::Attaching.is_marker(found));
        assert!(Moment::Attaching.is_marker("spotinit: volume: attaching vol-1 to i-1 as /dev/sdf"));
        assert!(Moment::Fsck.is_marker(TAKEOVER[0]));
        assert!(!Moment::UnderWrites.is_marker(TAKEOVER[0]));
    }

    #[test]
    fn intervals_overlap_only_when_they_share_an_instant() {
        let t = Instant::now();
        let m = |from: u64, until: Option<u64>| Mount {
            volume: "vol-1".into(),
            instance: "i".into(),
            from: t + Duration::from_secs(from),
            until: until.map(|u| t + Duration::from_secs(u)),
        };
        let now = t + Duration::from_secs(100);
        assert!(!m(0, Some(10)).overlaps(&m(10, None), now));
        assert!(m(0, Some(11)).overlaps(&m(10, Some(20)), now));
        assert!(m(0, None).overlaps(&m(50, Some(60)), now));
    }

    #[test]
    fn options_parse_with_defaults() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse_options(&args(&["--kills", "3", "--moves", "1"])).unwrap();
        assert_eq!((o.kills, o.graceful, o.races, o.moves), (3, 10, 10, 1));
        assert!(parse_options(&args(&["--kills"])).is_err());
        assert!(parse_options(&args(&["--nope"])).is_err());
    }
}
