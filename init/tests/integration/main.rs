//! spotinit's integration tests, one module per concern, in one test binary: each test binary
//! links the AWS SDK once more (minutes on two cores).
//! - `volume`, `lifecycle`: the volume phase and the spot lifecycle against moto + the fidelity
//!   layer + an IMDS mock, through the real SDK;
//! - `clock`: the clock probe against the simulator's NTP server;
//! - `notify`: notifications to the world's webhook receiver (one per process: a global);
//! - `privileged_volume`, `pid1`: loop devices, real mkfs/mount/binds, PID 1 of a PID namespace
//!   (root; each re-executes this binary for its one test inside the namespaces).
//!
//! Run one module: `cargo test --release -p spotinit --test integration volume::`

mod common;
mod instance;

mod clock;
mod lifecycle;
mod notify;
mod pid1;
mod pool;
mod privileged_volume;
mod volume;
