//! The EC2-fidelity layer: an HTTP proxy in front of moto that adds what real EC2 does and moto
//! does not.
//!
//! moto accepts things EC2 refuses and makes every transition instant: attaching an attached
//! volume silently moves it, attaching across zones works, the same device twice works,
//! `DetachVolume` without `InstanceId` crashes it (HTTP 500), `TerminateInstances` frees the
//! attached volumes at once. This layer parses each request's `Action`, checks what EC2 checks,
//! forwards to moto, and overlays moto's answers with its own state (one mutex): attach and
//! detach latency (with the block-device hooks inside it), volumes `creating`, snapshots
//! `pending` with rising `progress`, volume modifications `modifying` then `optimizing`, instances `shutting-down` then `terminated` while their
//! volumes stay held, and injected faults. Guests under QEMU user networking reach it as
//! `10.0.2.2:PORT`.
//!
//! Error codes and messages are EC2's, with the wire captures they were taken from noted at each.
//!
//! One file per part: the pacing ([`Settings`]), what the layer records ([`Request`],
//! [`Attachment`]), its state beside moto's (`state`), request dispatch and the clock check
//! (`dispatch`, `skew`), injected faults (`faults`), calls to moto (`forward`), and the actions
//! it handles itself: `attachments`, `termination`, `create_delete`, `describe`, `modify`.

mod attachments;
mod create_delete;
mod describe;
mod dispatch;
mod errors;
mod faults;
mod forward;
mod history;
mod modify;
mod settings;
mod skew;
mod state;
mod termination;

pub use faults::Fault;
pub use history::{Attachment, AttachmentEnd, Request};
pub use settings::Settings;
pub use skew::{parse_amz_date, MAX_CLOCK_SKEW};

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::moto::Ec2Client;
use crate::query::{http_response, request_id, serve_loopback};
use crate::EbsHooks;

use errors::internal_error;
use state::{Shared, State};

/// The fidelity layer, serving on 127.0.0.1; stops (with its background transitions) on drop.
pub struct Fidelity {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Fidelity {
    /// Serves the layer on a free loopback port, in front of the moto at `moto_endpoint`.
    pub async fn start(
        moto_endpoint: &str,
        hooks: Arc<dyn EbsHooks>,
        settings: Settings,
    ) -> std::io::Result<Fidelity> {
        let shared = Arc::new(Shared {
            moto: Ec2Client::new(moto_endpoint),
            hooks,
            settings,
            state: Mutex::new(State::default()),
            mutations: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            generation: AtomicU64::new(1),
        });
        let handler_shared = shared.clone();
        let (addr, server) = serve_loopback(move |req| {
            let shared = handler_shared.clone();
            async move {
                // A task of its own, so a client that gives up (a timeout) cannot cut a request
                // in half, e.g. between moto's attach and the overlay's `attaching`.
                match tokio::spawn(shared.handle(req)).await {
                    Ok(response) => response,
                    Err(e) => {
                        eprintln!("spotworld fidelity: request handler failed: {e}");
                        let error = internal_error();
                        http_response(500, &[], error.document(&request_id()))
                    }
                }
            }
        })
        .await?;
        Ok(Fidelity {
            addr,
            shared,
            server,
        })
    }

    /// `http://127.0.0.1:PORT` (a guest reaches it as `http://10.0.2.2:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A raw EC2 client talking to this layer (it sees what spotinit sees).
    pub fn client(&self) -> Ec2Client {
        Ec2Client::new(&self.endpoint())
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// The next `times` requests of `action` fail with `fault` (before any other check).
    pub fn inject(&self, action: &str, fault: Fault, times: usize) {
        let mut state = self.shared.lock();
        let queue = state.faults.entry(action.to_string()).or_default();
        queue.extend(std::iter::repeat_n(fault, times));
    }

    /// From now on a share (`rate`, 0 to 1) of the requests of `action`, chosen at random, fail
    /// with `fault` (throttling and 5xx under load, say). Several rates add up.
    pub fn inject_rate(&self, action: &str, fault: Fault, rate: f64) {
        self.shared
            .lock()
            .fault_rates
            .entry(action.to_string())
            .or_default()
            .push((fault, rate.clamp(0.0, 1.0)));
    }

    /// Ends every [`Fidelity::inject_rate`] (queued [`Fidelity::inject`] faults stay).
    pub fn clear_fault_rates(&self) {
        self.shared.lock().fault_rates.clear();
    }

    /// From now on every request of `action` gets `UnauthorizedOperation`, as with an IAM
    /// policy that lacks `ec2:<action>`.
    pub fn deny(&self, action: &str) {
        self.shared.lock().denied.insert(action.to_string());
    }

    /// Undoes [`Fidelity::deny`].
    pub fn allow(&self, action: &str) {
        self.shared.lock().denied.remove(action);
    }

    /// Names the caller using `access_key_id` in authorization errors (EC2 names an instance
    /// role's session after the instance: `assumed-role/<role>/<instance id>`).
    pub fn register_caller(&self, access_key_id: &str, session_name: &str) {
        self.shared
            .lock()
            .callers
            .insert(access_key_id.to_string(), session_name.to_string());
    }

    /// Every client request so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Every request the layer sent to moto so far (its own checks excluded), in order.
    pub fn moto_requests(&self) -> Vec<Request> {
        self.shared.lock().moto_requests.clone()
    }

    /// Every attachment so far, in the order its AttachVolume reached moto: open until the
    /// detach completes, a force-detach lets go, or a termination's release frees the volume.
    /// Two attachments of one volume that overlap in time are what EC2 never allows.
    pub fn attachment_history(&self) -> Vec<Attachment> {
        self.shared.lock().attachments.clone()
    }

    /// Terminates `instance_id` as EC2 does after a spot interruption (the simulator calls this
    /// when it kills the VM): the block-device side forgets the instance at once, the instance
    /// is `shutting-down`, then `terminated`; its volumes stay attached (and `VolumeInUse` to
    /// others) until [`Settings::release_after_termination`] has passed or someone
    /// force-detaches them, then they are `available`.
    pub async fn terminate(&self, instance_id: &str) -> Result<(), String> {
        let _guard = self.shared.mutations.lock().await;
        self.shared
            .terminate_locked(instance_id, None)
            .await
            .map(drop)
            .map_err(|e| format!("terminate {instance_id}: {e}"))
    }
}

impl Drop for Fidelity {
    fn drop(&mut self) {
        self.server.abort();
        for task in self
            .shared
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}
