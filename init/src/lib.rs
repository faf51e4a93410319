//! spotinit: PID 1 for a Docker host on EC2 spot instances whose state lives on an EBS volume.
//!
//! The boot reads top to bottom in [`boot`], the drain in [`shutdown`]. Privileged calls go
//! through [`sys::System`]; AWS calls through [`cloud`]; everything between is plain logic.

#[macro_use]
pub mod console;
pub mod boot;
pub mod cloud;
pub mod config;
pub mod critical;
pub mod host;
pub mod lifecycle;
pub mod listening;
pub mod machine;
pub mod notify;
pub mod pool_slot;
pub mod power;
pub mod retry;
pub mod run;
pub mod scheduled;
pub mod services;
pub mod shutdown;
pub mod sys;
pub mod testkit;
pub mod volume;

#[cfg(test)]
mod module_graph_tests;
