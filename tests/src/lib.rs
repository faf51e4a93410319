//! The spot world in a box: EC2 (moto behind a fidelity layer), IMDSv2 per instance, and QEMU
//! instances whose EBS volumes are backing files hot-plugged over QMP.
//!
//! Pieces, one module each:
//! - [`moto`]: the moto server process and a raw EC2 Query client for it.
//! - [`query`]: EC2 Query protocol helpers (form bodies, error documents, XML).
//! - [`fidelity`]: an HTTP proxy in front of moto that adds what real EC2 does and moto does not.
//! - [`imds`]: an IMDSv2 mock, one per simulated instance.
//! - [`qemu`]: a QEMU instance (q35, TCG), its console and its QMP socket.
//! - [`ebs`]: volumes as backing files, snapshots as copies, attach/detach as hot-plug.
//! - [`world`]: all of the above assembled: launch instances booted from the spotinit image.
//! - [`docker`]: a small Docker Engine API client and the counter test service.

pub mod docker;
pub mod ebs;
pub mod fidelity;
pub mod imds;
pub mod moto;
pub mod ntp;
pub mod qemu;
pub mod query;
pub mod registry;
pub mod tls;
pub mod webhook;
pub mod world;

use std::future::Future;
use std::pin::Pin;

/// A boxed future, so the hooks below can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the fidelity layer tells the block-device side of the world. The EC2 API state lives in
/// moto and the fidelity layer; these hooks make the devices follow it. The host-only tests use
/// [`NoDevices`]; the QEMU simulator uses [`ebs::EbsBridge`].
pub trait EbsHooks: Send + Sync + 'static {
    /// A volume now exists in the API (blank, or a copy of `snapshot_id`).
    fn volume_created<'a>(
        &'a self,
        volume_id: &'a str,
        size_gib: u64,
        snapshot_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// A snapshot of `volume_id` was taken: freeze its content now.
    fn snapshot_created<'a>(
        &'a self,
        snapshot_id: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// A modification of `volume_id` reached its new size: the block device grows to `size_gib`
    /// (an attached guest sees it at its next attach: QEMU's NVMe namespaces do not resize live).
    fn volume_resized<'a>(
        &'a self,
        volume_id: &'a str,
        size_gib: u64,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Make the volume appear in the instance; return once the guest could see it.
    fn attach<'a>(
        &'a self,
        instance_id: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Remove the volume from the instance; return once it is gone from the guest.
    fn detach<'a>(
        &'a self,
        instance_id: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// The instance is gone (killed): whatever it had attached is no longer plugged anywhere.
    fn instance_gone<'a>(&'a self, instance_id: &'a str) -> BoxFuture<'a, ()>;
}

/// Hooks for tests without virtual machines: the API state changes, no device follows it.
pub struct NoDevices;

impl EbsHooks for NoDevices {
    fn volume_created<'a>(
        &'a self,
        _: &'a str,
        _: u64,
        _: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn snapshot_created<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn volume_resized<'a>(&'a self, _: &'a str, _: u64) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn attach<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn detach<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn instance_gone<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}
