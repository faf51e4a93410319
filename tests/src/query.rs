//! EC2 Query protocol helpers shared by [`crate::moto`] and [`crate::fidelity`]: form bodies,
//! EC2 error documents, small in-place rewrites of XML responses, time stamps, and the loopback
//! HTTP server plumbing the fidelity layer and the IMDS mock share.
//!
//! The EC2 Query protocol is an `application/x-www-form-urlencoded` POST
//! (`Action=AttachVolume&Version=2016-11-15&VolumeId=vol-1&...`); lists are flattened into
//! numbered members (`VolumeId.1`, `Filter.1.Name`, `Filter.1.Value.2`,
//! `TagSpecification.1.Tag.2.Key`), numbered from 1.

use std::fmt;
use std::ops::Range;

/// The account moto uses by default, which EC2 error messages and ARNs name.
pub const DEFAULT_ACCOUNT_ID: &str = "123456789012";

/// The API version every EC2 Query request carries.
pub const EC2_API_VERSION: &str = "2016-11-15";

/// The XML namespace of EC2 responses.
pub const EC2_XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

// ---------------------------------------------------------------------------------------------
// Form bodies
// ---------------------------------------------------------------------------------------------

/// The parameters of one Query request, in the order they came.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Parses an `application/x-www-form-urlencoded` body (or URL query string).
    pub fn parse(body: &[u8]) -> Params {
        let mut params = Vec::new();
        for pair in body.split(|b| *b == b'&') {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            params.push((form_decode(key), form_decode(value)));
        }
        Params(params)
    }

    /// Builds parameters from `(key, value)` pairs.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Params {
        Params(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// Encodes back to a form body.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(&form_encode(k));
            out.push('=');
            out.push_str(&form_encode(v));
        }
        out
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The request's `Action`.
    pub fn action(&self) -> Option<&str> {
        self.get("Action")
    }

    /// A boolean parameter (`true`/`false`, as the SDK sends them); absent is `false`.
    pub fn flag(&self, key: &str) -> bool {
        self.get(key)
            .map(|v| v.eq_ignore_ascii_case("true"))
            .unwrap_or(false)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn into_pairs(self) -> Vec<(String, String)> {
        self.0
    }

    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }

    /// Appends the next `TagSpecification.N` (what [`Params::tag_specifications`] reads back);
    /// nothing when `tags` is empty.
    pub fn push_tag_specification(&mut self, resource_type: &str, tags: &[(&str, &str)]) {
        if tags.is_empty() {
            return;
        }
        let n = self
            .member_indexes("TagSpecification")
            .last()
            .copied()
            .unwrap_or(0)
            + 1;
        self.push(format!("TagSpecification.{n}.ResourceType"), resource_type);
        for (m, (k, v)) in tags.iter().enumerate() {
            self.push(format!("TagSpecification.{n}.Tag.{}.Key", m + 1), *k);
            self.push(format!("TagSpecification.{n}.Tag.{}.Value", m + 1), *v);
        }
    }

    /// Removes every parameter whose name starts with `prefix` followed by `.`
    /// (e.g. `Filter` removes `Filter.1.Name`, `Filter.1.Value.1`, ...).
    pub fn remove_members(&mut self, prefix: &str) {
        let dotted = format!("{prefix}.");
        self.0.retain(|(k, _)| !k.starts_with(&dotted));
    }

    /// The values of a flattened list `prefix.1`, `prefix.2`, ... in index order
    /// (`VolumeId` gives the values of `VolumeId.1`, `VolumeId.2`, ...).
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let mut items: Vec<(u32, String)> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(prefix)?.strip_prefix('.')?;
                let index: u32 = rest.parse().ok()?;
                Some((index, v.clone()))
            })
            .collect();
        items.sort_by_key(|(i, _)| *i);
        items.into_iter().map(|(_, v)| v).collect()
    }

    /// The indexes `N` present under `prefix.N.*` (e.g. the filters under `Filter`), sorted.
    pub fn member_indexes(&self, prefix: &str) -> Vec<u32> {
        let mut indexes: Vec<u32> = self
            .0
            .iter()
            .filter_map(|(k, _)| {
                let rest = k.strip_prefix(prefix)?.strip_prefix('.')?;
                rest.split('.').next()?.parse().ok()
            })
            .collect();
        indexes.sort_unstable();
        indexes.dedup();
        indexes
    }

    /// `Filter.N.Name` / `Filter.N.Value.M`, in index order.
    pub fn filters(&self) -> Vec<Filter> {
        self.member_indexes("Filter")
            .into_iter()
            .filter_map(|n| {
                let name = self.get(&format!("Filter.{n}.Name"))?.to_string();
                let values = self.list(&format!("Filter.{n}.Value"));
                Some(Filter { name, values })
            })
            .collect()
    }

    /// Replaces all `Filter.*` members by `filters`, numbered from 1 again.
    pub fn set_filters(&mut self, filters: &[Filter]) {
        self.remove_members("Filter");
        for (i, filter) in filters.iter().enumerate() {
            let n = i + 1;
            self.push(format!("Filter.{n}.Name"), filter.name.clone());
            for (j, value) in filter.values.iter().enumerate() {
                self.push(format!("Filter.{n}.Value.{}", j + 1), value.clone());
            }
        }
    }

    /// `TagSpecification.N.ResourceType` and its `TagSpecification.N.Tag.M.Key/Value`.
    pub fn tag_specifications(&self) -> Vec<TagSpecification> {
        self.member_indexes("TagSpecification")
            .into_iter()
            .map(|n| {
                let resource_type = self
                    .get(&format!("TagSpecification.{n}.ResourceType"))
                    .unwrap_or_default()
                    .to_string();
                let tags = self
                    .member_indexes(&format!("TagSpecification.{n}.Tag"))
                    .into_iter()
                    .filter_map(|m| {
                        let key = self.get(&format!("TagSpecification.{n}.Tag.{m}.Key"))?;
                        let value = self
                            .get(&format!("TagSpecification.{n}.Tag.{m}.Value"))
                            .unwrap_or_default();
                        Some((key.to_string(), value.to_string()))
                    })
                    .collect();
                TagSpecification {
                    resource_type,
                    tags,
                }
            })
            .collect()
    }
}

/// One `Filter.N` of a Describe request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

impl Filter {
    /// Whether `value` matches one of the filter's values (EC2 filter values may use `*` and
    /// `?` wildcards).
    pub fn matches(&self, value: &str) -> bool {
        self.values
            .iter()
            .any(|pattern| wildcard_match(pattern, value))
    }
}

/// One `TagSpecification.N` of a Create request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagSpecification {
    pub resource_type: String,
    pub tags: Vec<(String, String)>,
}

/// EC2's filter-value matching: `*` is any run of characters, `?` zero or one character, and a
/// backslash makes the next character literal (`\*`, `\?`, `\\`).
fn wildcard_match(pattern: &str, value: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Tok {
        Any,
        ZeroOrOne,
        Char(char),
    }
    fn go(p: &[Tok], v: &[char]) -> bool {
        match p.split_first() {
            None => v.is_empty(),
            Some((Tok::Any, rest)) => (0..=v.len()).any(|i| go(rest, &v[i..])),
            Some((Tok::ZeroOrOne, rest)) => go(rest, v) || (!v.is_empty() && go(rest, &v[1..])),
            Some((Tok::Char(c), rest)) => v.first() == Some(c) && go(rest, &v[1..]),
        }
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '\\' => Tok::Char(chars.next().unwrap_or('\\')),
            '*' => Tok::Any,
            '?' => Tok::ZeroOrOne,
            c => Tok::Char(c),
        });
    }
    let v: Vec<char> = value.chars().collect();
    go(&toks, &v)
}

/// Decodes one form component: `+` is a space, `%XX` a byte; invalid escapes stay as they are.
pub fn form_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < raw.len() => match (hex_value(raw[i + 1]), hex_value(raw[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Encodes one form component the way the AWS SDKs do (RFC 3986 unreserved characters stay,
/// everything else is `%XX`).
pub fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Error documents
// ---------------------------------------------------------------------------------------------

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

/// Escapes text for an XML element or attribute.
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Reading and rewriting XML responses
// ---------------------------------------------------------------------------------------------

/// The first child element named `name` (local name, namespaces ignored).
pub fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// The element reached from `node` through the child names in `path`.
pub fn path<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    path: &[&str],
) -> Option<roxmltree::Node<'a, 'input>> {
    path.iter().try_fold(node, |n, name| child(n, name))
}

/// The text of the child element `name` (empty elements give `""`).
pub fn child_text<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    child(node, name).map(|c| c.text().unwrap_or(""))
}

/// The text at `path` below `node`.
pub fn path_text<'a>(node: roxmltree::Node<'a, '_>, p: &[&str]) -> Option<&'a str> {
    path(node, p).map(|c| c.text().unwrap_or(""))
}

/// The `<item>` children of the element at `path` below `node` (e.g. `["volumeSet"]`).
pub fn items<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    set_path: &[&str],
) -> Vec<roxmltree::Node<'a, 'input>> {
    match path(node, set_path) {
        Some(set) => set
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "item")
            .collect(),
        None => Vec::new(),
    }
}

/// Edits to apply to the source text of a parsed document, by byte range. Edits must not
/// overlap; they are applied from the end so earlier ranges stay valid.
#[derive(Debug, Default)]
pub struct XmlEdits {
    edits: Vec<(Range<usize>, String)>,
}

impl XmlEdits {
    pub fn new() -> XmlEdits {
        XmlEdits::default()
    }

    /// Sets the text of `element` (which must hold text only, or nothing).
    pub fn set_text(&mut self, element: roxmltree::Node, text: &str) {
        match element.first_child() {
            Some(t) if t.is_text() => self.edits.push((t.range(), xml_escape(text))),
            _ => {
                // `<status/>` or `<status></status>`: write the whole element again.
                let name = element.tag_name().name();
                self.edits.push((
                    element.range(),
                    format!("<{name}>{}</{name}>", xml_escape(text)),
                ));
            }
        }
    }

    /// Sets the text of the element at `p` below `node`; false if there is no such element.
    pub fn set_path_text(&mut self, node: roxmltree::Node, p: &[&str], text: &str) -> bool {
        match path(node, p) {
            Some(element) => {
                self.set_text(element, text);
                true
            }
            None => false,
        }
    }

    /// Removes `node` from the document.
    pub fn remove(&mut self, node: roxmltree::Node) {
        self.edits.push((node.range(), String::new()));
    }

    /// Inserts raw XML just before the end tag of `element`.
    pub fn append_child_xml(&mut self, element: roxmltree::Node, xml: &str, src: &str) {
        let range = element.range();
        let end_tag = format!("</{}>", element.tag_name().name());
        let at = if src[range.clone()].ends_with(&end_tag) {
            range.end - end_tag.len()
        } else {
            // A self-closing element: rewrite it with the content.
            let name = element.tag_name().name();
            self.edits.push((range, format!("<{name}>{xml}</{name}>")));
            return;
        };
        self.edits.push((at..at, xml.to_string()));
    }

    /// Applies the edits to `src`, the text the nodes were parsed from.
    pub fn apply(mut self, src: &str) -> String {
        self.edits
            .sort_by_key(|(r, _)| std::cmp::Reverse((r.start, r.end)));
        let mut out = src.to_string();
        for (range, text) in self.edits {
            out.replace_range(range, &text);
        }
        out
    }
}

/// Within the `<item>` under `set_path` (below the root) whose `<id_tag>` is `id`, replaces the
/// text at `field_path` (relative to the item) by `text`. Returns the document unchanged when
/// nothing matches. For example `replace_item_text(xml, &["volumeSet"], "volumeId", "vol-1",
/// &["attachmentSet", "item", "status"], "attaching")`.
pub fn replace_item_text(
    xml: &str,
    set_path: &[&str],
    id_tag: &str,
    id: &str,
    field_path: &[&str],
    text: &str,
) -> Result<String, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    let mut edits = XmlEdits::new();
    for item in items(doc.root_element(), set_path) {
        if child_text(item, id_tag) == Some(id) {
            edits.set_path_text(item, field_path, text);
        }
    }
    Ok(edits.apply(xml))
}

// ---------------------------------------------------------------------------------------------
// Time stamps
// ---------------------------------------------------------------------------------------------

/// Formats a time as EC2 and IMDS do: `2026-11-26T12:00:00Z` (or with `.000Z` millis when
/// `millis` is set, as EC2's XML timestamps are).
pub fn format_time(t: std::time::SystemTime, millis: bool) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    if millis {
        format!(
            "{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}.{:03}Z",
            d.subsec_millis()
        )
    } else {
        format!("{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}Z")
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

// ---------------------------------------------------------------------------------------------
// Random identifiers
// ---------------------------------------------------------------------------------------------

/// `len` characters of `[a-z0-9]`, unpredictable enough for test tokens and request ids (std's
/// per-process random hasher keys, a counter and the clock; no RNG crate needed).
pub fn random_token(len: usize) -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let seed = RandomState::new();
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut h = seed.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        let mut bits = h.finish();
        for _ in 0..10 {
            if out.len() == len {
                break;
            }
            out.push(ALPHABET[(bits % ALPHABET.len() as u64) as usize] as char);
            bits /= ALPHABET.len() as u64;
        }
    }
    out
}

/// A request id shaped like EC2's (a UUID).
pub fn request_id() -> String {
    let hex: String = random_token(64)
        .bytes()
        .map(|b| char::from_digit(u32::from(b) % 16, 16).unwrap_or('0'))
        .take(32)
        .collect();
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

// ---------------------------------------------------------------------------------------------
// Loopback HTTP servers
// ---------------------------------------------------------------------------------------------

/// The response type of the loopback servers.
pub type HttpResponse = hyper::Response<http_body_util::Full<bytes::Bytes>>;

/// A response with a status, headers and body.
pub fn http_response(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<bytes::Bytes>,
) -> HttpResponse {
    let mut builder = hyper::Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(http_body_util::Full::new(body.into()))
        .expect("static response parts are valid")
}

/// An HTTP/1.1 server on 127.0.0.1 (free port), TCP_NODELAY on every accepted socket (or small
/// answers wait ~40 ms for delayed ACKs). `handle` gets each request with its body read. The
/// server and its connections stop when the returned task is aborted.
pub async fn serve_loopback<F, Fut>(
    handle: F,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>
where
    F: Fn(hyper::Request<bytes::Bytes>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = HttpResponse> + Send + 'static,
{
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // Connections live in this set, so aborting the accept loop drops (aborts) them too.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let _ = stream.set_nodelay(true);
                    let handle = handle.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let handle = handle.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let response = match body.collect().await {
                                    Ok(body) => handle(hyper::Request::from_parts(parts, body.to_bytes())).await,
                                    Err(e) => http_response(400, &[], format!("unreadable body: {e}")),
                                };
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn parses_form_bodies_with_escapes_and_plus() {
        let p = Params::parse(
            b"Action=CreateTags&ResourceId.1=vol-1&Tag.1.Key=Name&Tag.1.Value=my+state%2Fv%C3%A9&Empty=&Bare",
        );
        assert_eq!(p.action(), Some("CreateTags"));
        assert_eq!(p.get("Tag.1.Value"), Some("my state/vé"));
        assert_eq!(p.get("Empty"), Some(""));
        assert_eq!(p.get("Bare"), Some(""));
        assert_eq!(p.list("ResourceId"), vec!["vol-1".to_string()]);
        // A broken escape stays literal instead of being dropped.
        assert_eq!(Params::parse(b"A=100%").get("A"), Some("100%"));
        assert_eq!(Params::parse(b"A=%zz").get("A"), Some("%zz"));
    }

    #[test]
    fn filter_values_match_as_ec2_matches_them() {
        let f = |v: &str| Filter {
            name: "tag:Name".into(),
            values: vec![v.into()],
        };
        assert!(f("git*").matches("gitlab") && f("git*").matches("git*"));
        assert!(f("git\\*").matches("git*") && !f("git\\*").matches("gitlab"));
        // `?` is zero or one character.
        assert!(f("a?c").matches("ac") && f("a?c").matches("abc") && !f("a?c").matches("abbc"));
        assert!(f("a\\?").matches("a?") && !f("a\\?").matches("ab"));
        assert!(f(r"a\\b").matches(r"a\b"));
        // No character classes.
        assert!(f("x[1]").matches("x[1]") && !f("x[1]").matches("x1"));
    }

    #[test]
    fn encode_round_trips() {
        let p = Params::from_pairs([("Action", "X"), ("Tag.1.Value", "a b&c=d/é")]);
        assert_eq!(Params::parse(p.encode().as_bytes()), p);
    }

    #[test]
    fn lists_are_ordered_by_index_not_position() {
        let p =
            Params::parse(b"VolumeId.2=vol-b&VolumeId.10=vol-c&VolumeId.1=vol-a&VolumeIdX.1=no");
        assert_eq!(p.list("VolumeId"), vec!["vol-a", "vol-b", "vol-c"]);
    }

    #[test]
    fn pushed_tag_specifications_read_back() {
        let mut p = Params::from_pairs([("VolumeId", "vol-1")]);
        p.push_tag_specification("snapshot", &[]);
        p.push_tag_specification("volume", &[("Name", "state"), ("owner", "me")]);
        p.push_tag_specification("snapshot", &[("spotinit:purpose", "backup")]);
        let p = Params::parse(p.encode().as_bytes());
        assert_eq!(
            p.tag_specifications(),
            vec![
                TagSpecification {
                    resource_type: "volume".into(),
                    tags: vec![
                        ("Name".into(), "state".into()),
                        ("owner".into(), "me".into())
                    ],
                },
                TagSpecification {
                    resource_type: "snapshot".into(),
                    tags: vec![("spotinit:purpose".into(), "backup".into())],
                },
            ]
        );
    }

    #[test]
    fn filters_and_tag_specifications() {
        let mut p = Params::parse(
            b"Filter.2.Name=status&Filter.2.Value.1=available&Filter.1.Name=tag%3AName\
              &Filter.1.Value.1=state&Filter.1.Value.2=other\
              &TagSpecification.1.ResourceType=volume&TagSpecification.1.Tag.1.Key=Name\
              &TagSpecification.1.Tag.1.Value=state&TagSpecification.1.Tag.2.Key=owner\
              &TagSpecification.1.Tag.2.Value=me",
        );
        let filters = p.filters();
        assert_eq!(filters.len(), 2);
        assert_eq!(filters[0].name, "tag:Name");
        assert_eq!(filters[0].values, vec!["state", "other"]);
        assert_eq!(filters[1].name, "status");
        let specs = p.tag_specifications();
        assert_eq!(specs[0].resource_type, "volume");
        assert_eq!(
            specs[0].tags,
            vec![
                ("Name".to_string(), "state".to_string()),
                ("owner".to_string(), "me".to_string())
            ]
        );
        // Dropping a filter renumbers the rest from 1.
        p.set_filters(&filters[1..]);
        assert_eq!(p.get("Filter.1.Name"), Some("status"));
        assert_eq!(p.get("Filter.2.Name"), None);
        assert_eq!(p.filters(), filters[1..].to_vec());
    }

    #[test]
    fn filter_wildcards() {
        let f = Filter {
            name: "tag:Name".into(),
            values: vec!["state-*".into(), "exact".into()],
        };
        assert!(f.matches("state-1"));
        assert!(f.matches("exact"));
        assert!(!f.matches("exactly"));
        assert!(!f.matches("stat"));
    }

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

    const VOLUMES: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<DescribeVolumesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15"><volumeSet><item><volumeId>vol-a</volumeId><status>in-use</status><attachmentSet><item><volumeId>vol-a</volumeId><status>attached</status></item></attachmentSet></item><item><volumeId>vol-b</volumeId><status>available</status><attachmentSet/></item></volumeSet><requestId>r</requestId></DescribeVolumesResponse>"#;

    #[test]
    fn rewrites_text_inside_the_right_item_only() {
        let out = replace_item_text(
            VOLUMES,
            &["volumeSet"],
            "volumeId",
            "vol-a",
            &["attachmentSet", "item", "status"],
            "attaching",
        )
        .unwrap();
        let doc = roxmltree::Document::parse(&out).unwrap();
        let items = items(doc.root_element(), &["volumeSet"]);
        assert_eq!(
            path_text(items[0], &["attachmentSet", "item", "status"]),
            Some("attaching")
        );
        assert_eq!(child_text(items[0], "status"), Some("in-use"));
        assert_eq!(child_text(items[1], "status"), Some("available"));
    }

    #[test]
    fn edits_empty_elements_removals_and_appends() {
        let xml = "<r><a/><b>x</b><set><item>1</item><item>2</item></set><e></e><s/></r>";
        let doc = roxmltree::Document::parse(xml).unwrap();
        let root = doc.root_element();
        let mut edits = XmlEdits::new();
        edits.set_text(child(root, "a").unwrap(), "new & <esc>");
        edits.set_text(child(root, "b").unwrap(), "y");
        edits.remove(items(root, &["set"])[0]);
        edits.set_text(child(root, "e").unwrap(), "filled");
        edits.append_child_xml(child(root, "s").unwrap(), "<i>1</i>", xml);
        edits.append_child_xml(child(root, "set").unwrap(), "<item>3</item>", xml);
        assert_eq!(
            edits.apply(xml),
            "<r><a>new &amp; &lt;esc&gt;</a><b>y</b><set><item>2</item><item>3</item></set><e>filled</e><s><i>1</i></s></r>"
        );
    }

    #[test]
    fn formats_times_like_ec2() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_694_400_123); // 2026-11-26T12:00:00.123Z
        assert_eq!(format_time(t, false), "2026-11-26T12:00:00Z");
        assert_eq!(format_time(t, true), "2026-11-26T12:00:00.123Z");
        assert_eq!(format_time(UNIX_EPOCH, false), "1970-01-01T00:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_time(leap, false), "2000-02-29T00:00:00Z");
    }
}
