//! What to launch ([`InstanceSpec`], [`Net`]) and the launch: an instance in the API, its IMDS,
//! its VM booted from the image with the endpoints it needs.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use super::{SimInstance, World, DOCKER_API_PORT, LINK_LOCAL_HOST, SERVICE_PORT};
use crate::imds::ImdsMock;
use crate::qemu::{Error, Result, Vm, VmSpec};

/// How the guest reaches IMDS and the EC2 endpoint (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// `10.0.2.0/24`; both endpoints on the kernel command line at `10.0.2.2`.
    HostAlias,
    /// `169.254.0.0/16`; IMDS at `169.254.169.254:80`, EC2 at `169.254.2.2`.
    LinkLocal,
}

/// One instance to launch.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    /// Short name for logs and the work directory (`a`, `b`, `racer-1`).
    pub name: String,
    pub zone: String,
    /// TOML, served by IMDS as is (for UEFI with the EC2 endpoint put in front).
    pub user_data: Option<String>,
    /// Appended to the kernel command line (direct kernel boot only).
    pub extra_cmdline: String,
    /// Boot `spotinit.raw` under OVMF (systemd-boot, the UKI) instead of the direct kernel.
    pub uefi: bool,
    /// `None`: [`Net::HostAlias`] for direct boot, [`Net::LinkLocal`] for UEFI.
    pub net: Option<Net>,
    /// `-rtc base=…`: a wrong guest clock.
    pub rtc_base: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Guest ports forwarded to free host ports (default: the Docker API and the service).
    pub forward_ports: Vec<u16>,
    /// The EC2 key pair's public key(s) IMDS serves from the start (`public-keys/`).
    pub public_keys: Vec<(String, String)>,
}

impl InstanceSpec {
    pub fn new(name: &str, zone: &str) -> InstanceSpec {
        InstanceSpec {
            name: name.to_owned(),
            zone: zone.to_owned(),
            user_data: None,
            extra_cmdline: String::new(),
            uefi: false,
            net: None,
            rtc_base: None,
            memory_mib: crate::qemu::DEFAULT_MEMORY_MIB,
            cpus: crate::qemu::DEFAULT_CPUS,
            forward_ports: vec![DOCKER_API_PORT, SERVICE_PORT],
            public_keys: Vec::new(),
        }
    }
    pub fn user_data(mut self, text: impl Into<String>) -> Self {
        self.user_data = Some(text.into());
        self
    }
    pub fn extra_cmdline(mut self, words: &str) -> Self {
        self.extra_cmdline = words.to_owned();
        self
    }
    pub fn uefi(mut self) -> Self {
        self.uefi = true;
        self
    }
    pub fn net(mut self, net: Net) -> Self {
        self.net = Some(net);
        self
    }
    pub fn rtc_base(mut self, base: &str) -> Self {
        self.rtc_base = Some(base.to_owned());
        self
    }
    /// Launched with the EC2 key pair `name` (its public key served by IMDS before the boot).
    pub fn key_pair(mut self, name: &str, public_key: &str) -> Self {
        self.public_keys
            .push((name.to_owned(), public_key.trim().to_owned()));
        self
    }
    /// Also forward `guest_port` to a free host port.
    pub fn forward(mut self, guest_port: u16) -> Self {
        self.forward_ports.push(guest_port);
        self
    }
}

impl World {
    /// Launches an instance: RunInstances in moto, an IMDS mock with its identity, user data and
    /// role (its access key registered with the fidelity layer, so authorization errors name the
    /// instance), a VM booted from the image, registered with the EBS bridge before it can call
    /// AttachVolume. Returns once QEMU runs; wait for markers on [`SimInstance::console`].
    pub async fn launch(&self, spec: InstanceSpec) -> Result<SimInstance> {
        let what = format!("launch instance {} in {}", spec.name, spec.zone);
        let net = spec.net.unwrap_or(if spec.uefi {
            Net::LinkLocal
        } else {
            Net::HostAlias
        });
        if spec.uefi && net == Net::HostAlias {
            return Err(Error::new(format!(
                "{what}: a UEFI boot cannot take the endpoints on its kernel command line (it is \
                 sealed in the UKI): use Net::LinkLocal"
            )));
        }
        if spec.uefi {
            check_file(
                crate::qemu::OVMF_CODE,
                "apt-get install ovmf (UEFI firmware for QEMU)",
            )?;
        }
        let id = self
            .fidelity
            .client()
            .run_instance(&spec.zone)
            .await
            .map_err(|e| Error::new(format!("{what}: RunInstances: {e}")))?;
        let what = format!("{what} ({id})");

        let (host, ec2_endpoint_in_user_data) = match net {
            Net::HostAlias => ("10.0.2.2", false),
            Net::LinkLocal => (LINK_LOCAL_HOST, spec.uefi),
        };
        let ec2_endpoint = format!("http://{host}:{}", self.fidelity.port());
        let ntp_server = format!("{host}:{}", self.ntp.port());
        let user_data = if ec2_endpoint_in_user_data {
            let u = spec.user_data.clone().unwrap_or_default();
            if u.lines()
                .any(|l| l.trim_start().starts_with("[aws") || l.trim_start().starts_with("[time"))
            {
                return Err(Error::new(format!(
                    "{what}: the world puts aws.ec2_endpoint and time.servers into the user data \
                     of a UEFI instance; the user data must not have an [aws] or [time] table"
                )));
            }
            Some(format!(
                "aws.ec2_endpoint = \"{ec2_endpoint}\"\ntime.servers = [\"{ntp_server}\"]\n{u}"
            ))
        } else {
            spec.user_data.clone()
        };
        let mut identity = crate::imds::Identity::new(&id, &spec.zone);
        if net == Net::LinkLocal {
            identity.private_ip = "169.254.2.15".into();
            identity.local_hostname = "ip-169-254-2-15.ec2.internal".into();
        }
        let imds = ImdsMock::start(identity, user_data.clone())
            .await
            .map_err(|e| Error::new(format!("{what}: start its IMDS mock: {e}")))?;
        if let Some(c) = imds.credentials() {
            self.fidelity.register_caller(&c.access_key_id, &id);
        }
        for (name, key) in &spec.public_keys {
            imds.set_public_key(name, key);
        }

        let work_dir = self.dir.join(format!("{}-{id}", spec.name));
        let mut vm_spec = if spec.uefi {
            VmSpec::uefi(&spec.name, &work_dir, &self.image.disk)
        } else {
            let mut append = self.image.cmdline.clone();
            if net == Net::HostAlias {
                append.push_str(&format!(
                    " spotinit.imds_endpoint=http://{host}:{}",
                    imds.port()
                ));
            }
            append.push_str(&format!(
                " spotinit.aws.ec2_endpoint={ec2_endpoint} spotinit.time.servers=['{ntp_server}']"
            ));
            if !spec.extra_cmdline.is_empty() {
                append.push(' ');
                append.push_str(&spec.extra_cmdline);
            }
            VmSpec::direct_kernel(
                &spec.name,
                &work_dir,
                &self.image.kernel,
                Some(&self.image.initrd),
                &append,
            )
            .with_root_disk(&self.image.disk)
        };
        vm_spec = vm_spec
            .with_memory_mib(spec.memory_mib)
            .with_cpus(spec.cpus);
        if net == Net::LinkLocal {
            vm_spec = vm_spec.with_subnet("169.254.0.0/16").with_guest_forward(
                Ipv4Addr::new(169, 254, 169, 254),
                80,
                imds.port(),
            );
        }
        for port in &spec.forward_ports {
            vm_spec = vm_spec.with_host_forward(0, *port);
        }
        if let Some(base) = &spec.rtc_base {
            vm_spec = vm_spec.with_rtc_base(base);
        }
        if let Some(u) = &user_data {
            let _ = std::fs::create_dir_all(&work_dir);
            let _ = std::fs::write(work_dir.join("user-data.toml"), u);
        }
        let vm = Arc::new(Vm::start(vm_spec).await.map_err(|e| e.context(&what))?);
        let started = Instant::now() - vm.uptime();
        // Before the guest can ask for an attachment.
        self.ebs.register_instance(&id, vm.clone());
        Ok(SimInstance {
            id,
            name: spec.name,
            zone: spec.zone,
            vm,
            imds,
            fidelity: self.fidelity.clone(),
            ebs: self.ebs.clone(),
            started,
        })
    }
}

impl World {
    /// Launches the instances at once, as an Auto Scaling group does; returns them in the order
    /// given, or the first launch's error (the others are dropped, which kills their VMs).
    pub async fn launch_all(&self, specs: Vec<InstanceSpec>) -> Result<Vec<SimInstance>> {
        type Launch<'a> = Pin<Box<dyn Future<Output = Result<SimInstance>> + Send + 'a>>;
        let mut pending: Vec<Option<Launch<'_>>> = specs
            .into_iter()
            .map(|s| Some(Box::pin(self.launch(s)) as Launch<'_>))
            .collect();
        let mut launched: Vec<Option<Result<SimInstance>>> = pending.iter().map(|_| None).collect();
        // Polls every launch still running on each wake-up: a handful, so no bookkeeping of
        // which one woke.
        std::future::poll_fn(|cx| {
            let mut running = false;
            for (launch, out) in pending.iter_mut().zip(launched.iter_mut()) {
                if let Some(f) = launch {
                    match f.as_mut().poll(cx) {
                        Poll::Ready(r) => {
                            *out = Some(r);
                            *launch = None;
                        }
                        Poll::Pending => running = true,
                    }
                }
            }
            if running {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        launched
            .into_iter()
            .map(|r| r.expect("every launch finished"))
            .collect()
    }
}

fn check_file(path: &str, fix: &str) -> Result<()> {
    if Path::new(path).is_file() {
        Ok(())
    } else {
        Err(Error::new(format!("{path} not found: {fix}")))
    }
}
