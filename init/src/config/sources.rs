//! Where configuration text comes from and how it becomes one TOML table: each text source
//! parsed alone (so its errors carry its own line numbers), the kernel command line's
//! `spotinit.<dotted.key>=<value>` words, the deep merge, and which source and line set a key.
//!
//! Messages never echo a value: user data is readable by anyone with console access, and a
//! value may be a secret. Keys, lines and the expected form are enough to fix it.

use super::error::{ConfigError, Source};
use super::model::Config;

/// EC2 refuses user data over 16 KB; larger text is not spotinit's configuration.
pub const MAX_TEXT_BYTES: usize = 16 << 10;
/// A `spotinit.a.b.c=` key with more segments than any key of the schema (docker.daemon aside)
/// is refused before it is turned into nested tables.
pub const MAX_KEY_SEGMENTS: usize = 12;

/// Configuration text as given by one source.
pub struct Text<'a> {
    pub source: Source,
    pub text: &'a str,
}

/// Parses and checks one TOML text alone, so its errors carry its own line numbers.
pub(super) fn parse_text(t: &Text<'_>) -> Result<toml::Table, Vec<ConfigError>> {
    let err = |line: Option<usize>, message: String| ConfigError {
        source: t.source,
        line,
        key: None,
        message,
    };
    if t.text.len() > MAX_TEXT_BYTES {
        return Err(vec![err(
            None,
            format!(
                "{} bytes; EC2 user data and spotinit's configuration are at most {MAX_TEXT_BYTES} bytes (16 KB)",
                t.text.len()
            ),
        )]);
    }
    let trimmed = t.text.trim_start();
    if trimmed.starts_with("#!") {
        return Err(vec![err(
            Some(1),
            "this is a shell script; spotinit reads its settings as TOML (see the configuration reference in the README)".into(),
        )]);
    }
    if trimmed.starts_with("#cloud-config") {
        return Err(vec![err(
            Some(1),
            "this is cloud-init configuration; spotinit has no cloud-init and reads TOML (see the configuration reference in the README)".into(),
        )]);
    }
    if let Err(e) = toml::from_str::<Config>(t.text) {
        let line = e.span().map(|s| line_of_offset(t.text, s.start));
        let mut message = toml_message(&e);
        // The key of the line, never its value.
        if let Some(key) = line
            .and_then(|l| t.text.lines().nth(l - 1))
            .and_then(|src| src.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && !k.starts_with('['))
        {
            message = format!("{message} (in: {key} = …)");
        }
        return Err(vec![err(line, message)]);
    }
    toml::from_str::<toml::Table>(t.text).map_err(|e| vec![err(None, toml_message(&e))])
}

pub(super) fn toml_message(e: &toml::de::Error) -> String {
    redact(&e.message().trim().replace('\n', " "))
}

/// A parser message without the values it quotes (`invalid type: string "hunter2"`): what
/// follows `string`, `integer` and the like, and anything in double quotes, becomes `…`.
pub fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find('"') {
        out.push_str(&rest[..i]);
        match rest[i + 1..].find('"') {
            Some(j) => {
                out.push_str("\"…\"");
                rest = &rest[i + 1 + j + 1..];
            }
            None => {
                out.push_str("\"…");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    for kind in ["integer ", "float ", "boolean ", "character "] {
        let mut redacted = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(kind) {
            redacted.push_str(&rest[..i + kind.len()]);
            let after = &rest[i + kind.len()..];
            let end = after.find([',', ' ']).unwrap_or(after.len());
            redacted.push('…');
            rest = &after[end..];
        }
        redacted.push_str(rest);
        out = redacted;
    }
    out
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Deep merge: tables merge key by key, anything else is replaced.
pub(super) fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Splits a kernel command line into words, honouring double quotes as the kernel does.
pub fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// The `spotinit.*` keys of a kernel command line as a TOML table. A value is read as TOML
/// (numbers, booleans, arrays) when it parses as such, else as a string.
pub fn cmdline_table(cmdline: &str) -> Result<toml::Table, Vec<ConfigError>> {
    let mut table = toml::Table::new();
    let mut errors = Vec::new();
    for word in cmdline_words(cmdline) {
        let Some(rest) = word.strip_prefix("spotinit.") else {
            continue;
        };
        let (key, raw) = rest.split_once('=').unwrap_or((rest, "true"));
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) || parts.len() > MAX_KEY_SEGMENTS {
            errors.push(ConfigError {
                source: Source::KernelCommandLine,
                line: None,
                key: Some(format!("spotinit.{}", redact_key(key))),
                message: format!("a key of 1 to {MAX_KEY_SEGMENTS} non-empty segments"),
            });
            continue;
        }
        let mut nested = toml::Table::new();
        nested.insert(parts[parts.len() - 1].to_string(), value);
        for p in parts[..parts.len() - 1].iter().rev() {
            let mut t = toml::Table::new();
            t.insert(p.to_string(), toml::Value::Table(nested));
            nested = t;
        }
        // Check this key alone so the error names it.
        if let Err(e) = toml::Value::Table(nested.clone()).try_into::<Config>() {
            errors.push(ConfigError {
                source: Source::KernelCommandLine,
                line: None,
                key: Some(format!("spotinit.{key}")),
                message: toml_message(&e),
            });
            continue;
        }
        merge(&mut table, nested);
    }
    if errors.is_empty() {
        Ok(table)
    } else {
        Err(errors)
    }
}

/// Which source set a dotted key last (highest precedence), and on which line if it is text.
pub(super) fn origin(
    key: &str,
    cmdline: &str,
    user_data: Option<&str>,
    image_file: Option<&str>,
) -> (Source, Option<usize>) {
    if cmdline_words(cmdline)
        .iter()
        .any(|w| w.starts_with(&format!("spotinit.{key}")))
    {
        return (Source::KernelCommandLine, None);
    }
    for (source, text) in [
        (Source::UserData, user_data),
        (Source::ImageFile, image_file),
    ] {
        if let Some(t) = text {
            if let Some(line) = line_of_key(t, key) {
                return (source, Some(line));
            }
        }
    }
    (Source::UserData, None)
}

/// Best effort: the line of `a.b.c` in TOML text (`[a.b]` then `c =`, `[a]` then `b.c =` or
/// `b = {.. c ..}`, or a top-level `a.b.c =`).
pub fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut section: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            section = name.split('.').map(|s| s.trim().to_string()).collect();
            if section.iter().map(String::as_str).eq(parts.iter().copied()) {
                return Some(i + 1);
            }
            continue;
        }
        let Some((lhs, _)) = line.split_once('=') else {
            continue;
        };
        let lhs: Vec<String> = lhs
            .trim()
            .split('.')
            .map(|s| s.trim().trim_matches('"').to_string())
            .collect();
        let full: Vec<&str> = section
            .iter()
            .map(String::as_str)
            .chain(lhs.iter().map(String::as_str))
            .collect();
        let n = full.len().min(parts.len());
        if parts[..n] == full[..n] {
            return Some(i + 1);
        }
    }
    None
}

/// A key as it may appear in a message: at most 64 characters of it.
fn redact_key(key: &str) -> String {
    match key.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &key[..i]),
        None => key.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_words_honour_quotes_and_types() {
        assert_eq!(
            cmdline_words("a \"b c\" d=\"e f\""),
            vec!["a", "b c", "d=e f"]
        );
        let t =
            cmdline_table("spotinit.volume.create=false spotinit.volume.tags.Name=x-y").unwrap();
        assert_eq!(t["volume"]["create"], toml::Value::Boolean(false));
        assert_eq!(
            t["volume"]["tags"]["Name"],
            toml::Value::String("x-y".into())
        );
    }

    #[test]
    fn line_of_key_finds_sections_and_dotted_keys() {
        let t = "hostname = \"h\"\n[volume]\nid = \"x\"\n[volume.tags]\nName = \"n\"\n";
        assert_eq!(line_of_key(t, "volume.id"), Some(3));
        assert_eq!(line_of_key(t, "volume.tags"), Some(4));
        assert_eq!(line_of_key(t, "volume.tags.Name"), Some(5));
        assert_eq!(line_of_key(t, "hostname"), Some(1));
        assert_eq!(
            line_of_key("volume.size_gib = 3", "volume.size_gib"),
            Some(1)
        );
    }

    #[test]
    fn messages_lose_the_values_they_quote() {
        assert_eq!(
            redact("invalid type: string \"hunter2\", expected u64"),
            "invalid type: string \"…\", expected u64"
        );
        assert_eq!(
            redact("invalid value: integer `-5`, expected u32"),
            "invalid value: integer …, expected u32"
        );
        assert_eq!(redact("unknown field `sizee`"), "unknown field `sizee`");
    }

    #[test]
    fn a_secret_in_user_data_never_reaches_the_message() {
        let user = "[docker]\nstop_timeout_secs = \"s3cr3t-token\"\n";
        let e = Config::load("", Some(user), None).unwrap_err();
        let shown = e[0].to_string();
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(
            shown.contains("line 2") && shown.contains("stop_timeout_secs"),
            "{shown}"
        );
        let e = Config::load("spotinit.docker.stop_timeout_secs=s3cr3t", None, None).unwrap_err();
        assert!(!e[0].to_string().contains("s3cr3t"), "{}", e[0]);
    }

    #[test]
    fn oversized_text_and_endless_keys_are_refused() {
        let big = format!("hostname = \"h\"\n# {}\n", "x".repeat(MAX_TEXT_BYTES));
        let e = Config::load("", Some(&big), None).unwrap_err();
        assert!(e[0].message.contains("at most 16384 bytes"), "{}", e[0]);
        let deep = format!("spotinit.docker.daemon{}=1", ".a".repeat(40));
        let e = Config::load(&deep, None, None).unwrap_err();
        assert!(e[0].message.contains("segments"), "{}", e[0]);
    }
}
