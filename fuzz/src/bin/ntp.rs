//! The `ntp` fuzz target (see the crate's doc).
fn main() {
    spotinit_fuzz::main(spotinit_fuzz::ntp);
}
