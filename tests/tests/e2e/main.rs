//! The end-to-end scenarios, one module each, in one test binary: every test binary links the
//! AWS SDK once more (a thin-LTO link of minutes on two cores), and the scenarios share their
//! helpers anyway. Each scenario boots VMs, so they take turns (`one_scenario_at_a_time`)
//! whatever `--test-threads` says.
//!
//! Run one: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_2_graceful -- --nocapture`

mod common;

mod e2e_10_wrong_clock;
mod e2e_11_ssh;
mod e2e_12_imds_blocked;
mod e2e_13_concurrent_move;
mod e2e_14_drain_leftovers;
mod e2e_15_declared_containers;
mod e2e_16_grow;
mod e2e_17_handover;
mod e2e_18_pool;
mod e2e_1_first_boot;
mod e2e_2_graceful_interruption;
mod e2e_3_hard_kill;
mod e2e_4_another_zone;
mod e2e_5_race;
mod e2e_6_bad_input;
mod e2e_7_uefi;
mod e2e_8_notice_ten_containers;
mod e2e_9_notice_during_boot;
