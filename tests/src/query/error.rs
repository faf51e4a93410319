//! EC2 error documents: the error type, the HTTP status for a code, and the document as EC2
//! writes it and reads back.

use std::fmt;

use super::{child_text, xml_escape};

/// An EC2 API error: the code and message of an EC2 error document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Error {
    pub code: String,
    pub message: String,
}

impl Ec2Error {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Ec2Error {
        Ec2Error {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The HTTP status EC2 answers this error with.
    pub fn status(&self) -> u16 {
        status_for_code(&self.code)
    }

    /// The error document, exactly as EC2 writes it.
    pub fn document(&self, request_id: &str) -> String {
        error_document(&self.code, &self.message, request_id)
    }
}

impl fmt::Display for Ec2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Ec2Error {}

/// The HTTP status EC2 uses for an error code: 403 for authorization failures, 503 for
/// throttling and overload, 500 for internal errors, 400 for every other client error.
pub fn status_for_code(code: &str) -> u16 {
    match code {
        "UnauthorizedOperation" | "AuthFailure" | "Blocked" | "OptInRequired" => 403,
        "RequestLimitExceeded" | "Unavailable" | "ServiceUnavailable" => 503,
        "InternalError" | "InternalFailure" => 500,
        _ => 400,
    }
}

/// An EC2 error document. EC2's own has no namespace and no whitespace:
/// `<?xml version="1.0" encoding="UTF-8"?>` then
/// `<Response><Errors><Error><Code>..</Code><Message>..</Message></Error></Errors><RequestID>..</RequestID></Response>`
/// (as captured from the wire in kubernetes-sigs/aws-ebs-csi-driver#1801).
pub fn error_document(code: &str, message: &str, request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code>\
         <Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
        xml_escape(code),
        xml_escape(message),
        xml_escape(request_id)
    )
}

/// Reads the first error's code and message from an EC2 error document.
pub fn parse_error_document(xml: &str) -> Option<Ec2Error> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let error = doc.descendants().find(|n| n.has_tag_name("Error"))?;
    let code = child_text(error, "Code")?.to_string();
    let message = child_text(error, "Message").unwrap_or_default().to_string();
    Some(Ec2Error { code, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_document_is_ec2s_and_parses_back() {
        let doc = error_document("VolumeInUse", "vol-1 is <busy> & \"x\"", "req-1");
        assert!(doc.starts_with(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>VolumeInUse</Code>"
        ));
        assert!(doc.ends_with("<RequestID>req-1</RequestID></Response>"));
        let e = parse_error_document(&doc).unwrap();
        assert_eq!(e.code, "VolumeInUse");
        assert_eq!(e.message, "vol-1 is <busy> & \"x\"");
        assert_eq!(status_for_code("VolumeInUse"), 400);
        assert_eq!(status_for_code("InvalidVolume.ZoneMismatch"), 400);
        assert_eq!(status_for_code("UnauthorizedOperation"), 403);
        assert_eq!(status_for_code("RequestLimitExceeded"), 503);
        assert_eq!(status_for_code("Unavailable"), 503);
        assert_eq!(status_for_code("InternalError"), 500);
    }
}
