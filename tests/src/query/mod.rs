//! EC2 Query protocol helpers shared by [`crate::moto`] and [`crate::fidelity`]: form bodies,
//! EC2 error documents, small in-place rewrites of XML responses, time stamps, and the loopback
//! HTTP server plumbing the fidelity layer and the IMDS mock share.
//!
//! The EC2 Query protocol is an `application/x-www-form-urlencoded` POST
//! (`Action=AttachVolume&Version=2016-11-15&VolumeId=vol-1&...`); lists are flattened into
//! numbered members (`VolumeId.1`, `Filter.1.Name`, `Filter.1.Value.2`,
//! `TagSpecification.1.Tag.2.Key`), numbered from 1.
//!
//! One file per part: form bodies (`form`) and Describe filters (`filter`), error documents
//! (`error`), XML reading and rewriting (`xml`), time stamps (`time`), random identifiers (`ids`)
//! and the loopback server (`server`).

mod error;
mod filter;
mod form;
mod ids;
mod server;
mod time;
mod xml;

pub use error::{error_document, parse_error_document, status_for_code, Ec2Error};
pub use filter::Filter;
pub use form::{Params, TagSpecification};
pub use ids::{random_token, request_id};
pub use server::{http_response, serve_loopback, HttpResponse};
pub use time::format_time;
pub use xml::{child, child_text, items, path, path_text, replace_item_text, xml_escape, XmlEdits};

/// The account moto uses by default, which EC2 error messages and ARNs name.
pub const DEFAULT_ACCOUNT_ID: &str = "123456789012";

/// The API version every EC2 Query request carries.
pub const EC2_API_VERSION: &str = "2016-11-15";

/// The XML namespace of EC2 responses.
pub const EC2_XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";
