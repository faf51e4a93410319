//! What each run found, and the table of losses at the end.

use std::time::Duration;

use crate::kinds::Kind;

pub struct RunResult {
    pub kind: Kind,
    pub number: usize,
    pub moment: String,
    pub acked: Option<u64>,
    pub served: Option<u64>,
    pub lost: u64,
    pub wrong_root: Vec<String>,
    pub attached_twice: Vec<String>,
    pub mounted_twice: Vec<String>,
    pub forks: Vec<String>,
    pub recovery: Option<Duration>,
    pub failure: Option<String>,
    pub notes: Vec<String>,
}

impl RunResult {
    pub fn new(kind: Kind, number: usize, moment: &str) -> RunResult {
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

    pub fn line(&self) -> String {
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

/// One row of the table.
pub struct Tally {
    name: String,
    runs: usize,
    lost: u64,
    wrong_root: usize,
    attached_twice: usize,
    mounted_twice: usize,
    forks: usize,
    worst: Option<Duration>,
    pub failed: usize,
}

impl Tally {
    pub fn of<'a>(name: &str, runs: impl Iterator<Item = &'a RunResult>) -> Tally {
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

    pub fn losses(&self) -> bool {
        self.lost > 0
            || self.wrong_root > 0
            || self.attached_twice > 0
            || self.mounted_twice > 0
            || self.forks > 0
    }

    pub fn row(&self) -> String {
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
