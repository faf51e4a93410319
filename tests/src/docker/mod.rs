//! A minimal Docker Engine API client over a forwarded TCP port — TLS with the test PKI's client
//! certificate ([`crate::tls`]), as a careful user reaches dockerd — and the test service: a
//! counter kept on a Docker volume, served by busybox httpd in an image made on the host.
//!
//! The image is a tarball built here from busybox-static's `/bin/busybox` (applet symlinks, a
//! CGI script, an entrypoint), imported through the API (`POST /images/create?fromSrc=-`, what
//! `docker import` does) or pushed to the world's registry ([`crate::registry`]) as its layer.
//!
//! The counter increments durably: new value to a temporary file, `sync FILE` (fsync), rename
//! over the old file, `sync -f` (syncfs: the rename is committed too), and only then the answer.
//! So every value the service answered survives a hard kill of the instance.
//!
//! One file per part: the Engine API client (`client`), the counter image (`image`), the
//! counter's container and its HTTP client (`counter`).

mod client;
mod counter;
mod image;

pub use client::{ContainerSpec, ContainerSummary, Docker};
pub use counter::{
    counter_container, counter_container_named, deploy_counter, http_get, Counter, COUNTER_NAME,
    COUNTER_VOLUME,
};
pub use image::{counter_image_tar, import_counter_image, push_counter_image, COUNTER_IMAGE};
