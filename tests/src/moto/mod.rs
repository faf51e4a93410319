//! The moto server process, and a raw EC2 Query client (no SDK) with typed helpers.
//!
//! The client speaks to any EC2 Query endpoint: moto itself, or the fidelity layer in front of
//! it (then it sees what spotinit sees).
//!
//! One file per part: the server process (`server`), the client (`client`), its error
//! (`error`), the types its helpers return (`types`) and the parsing of the answers into them
//! (`parse`), and unique temporary directories (`temp_dir`).

mod client;
mod error;
mod parse;
mod server;
mod temp_dir;
mod types;

pub use client::Ec2Client;
pub use error::CallError;
pub use parse::{
    parse_instances, parse_snapshot, parse_snapshots, parse_volume, parse_volumes, root_text,
};
pub use server::{free_port, MotoServer};
pub use temp_dir::unique_temp_dir;
pub use types::{Instance, Snapshot, Volume, VolumeAttachment};

/// The AMI the test instances run (one moto knows).
pub const TEST_IMAGE_ID: &str = "ami-03cf127a";
/// The instance type of the test instances.
pub const TEST_INSTANCE_TYPE: &str = "t3.small";
/// An Authorization header moto accepts: it only reads the access key and the region of the
/// credential scope (us-east-1), and does not check the signature.
pub const TEST_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
    Credential=AKIDTEST/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=00";
