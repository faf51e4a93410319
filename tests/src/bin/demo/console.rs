//! What spotinit's console says: a line found or waited for, and what its ready line tells.

use std::time::Duration;

use spotworld::qemu::ConsoleLine;
use spotworld::world::SimInstance;

use crate::e;

/// The first console line containing `needle`.
pub fn find(i: &SimInstance, needle: &str) -> Option<ConsoleLine> {
    i.console()
        .lines()
        .into_iter()
        .find(|l| l.text.contains(needle))
}

pub async fn wait(
    i: &SimInstance,
    needle: &str,
    deadline: Duration,
) -> Result<ConsoleLine, String> {
    i.console().wait_for(needle, deadline).await.map_err(e)
}

/// "ready 41.6 s after power-on" from spotinit's ready line.
pub fn after_spotinit(ready: &ConsoleLine) -> String {
    let since = ready
        .text
        .split("ready in ")
        .nth(1)
        .and_then(|s| s.split(" since").next())
        .unwrap_or("?");
    format!("ready {since} after power-on")
}

/// spotinit's resident memory once Docker is up, from the `ready` line ("its memory N kB").
pub fn spotinit_memory(ready: &ConsoleLine) -> String {
    ready
        .text
        .split("its memory ")
        .nth(1)
        .map(|s| s.trim_end_matches(')').to_owned())
        .unwrap_or_else(|| "?".into())
}
