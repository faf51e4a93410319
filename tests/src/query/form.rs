//! Form bodies: the parameters of a Query request, parsed, built and encoded as the SDKs do,
//! with the flattened lists (`VolumeId.N`, `Filter.N.*`, `TagSpecification.N.*`) read back.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::Filter;

/// What the AWS SDKs escape as `%XX`: every byte but the RFC 3986 unreserved characters.
const SDK_ENCODED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The parameters of one Query request, in the order they came.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Parses an `application/x-www-form-urlencoded` body (or URL query string).
    pub fn parse(body: &[u8]) -> Params {
        Params(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
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

    /// Encodes back to a form body, as the AWS SDKs do.
    pub fn encode(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    utf8_percent_encode(k, SDK_ENCODED),
                    utf8_percent_encode(v, SDK_ENCODED)
                )
            })
            .collect::<Vec<_>>()
            .join("&")
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

/// One `TagSpecification.N` of a Create request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagSpecification {
    pub resource_type: String,
    pub tags: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(Params::parse(b"A=%4").get("A"), Some("%4"));
        assert_eq!(Params::parse(b"A=a%2Bb+c").get("A"), Some("a+b c"));
        assert_eq!(Params::parse(b"&&A=1&&").pairs().len(), 1);
    }

    #[test]
    fn encodes_as_the_sdks_do() {
        let p = Params::from_pairs([("Tag.1.Value", "a b+c*d/é~-_.")]);
        assert_eq!(p.encode(), "Tag.1.Value=a%20b%2Bc%2Ad%2F%C3%A9~-_.");
        let p = Params::from_pairs([("Action", "X"), ("Empty", "")]);
        assert_eq!(p.encode(), "Action=X&Empty=");
    }

    #[test]
    fn encode_round_trips() {
        let value = "a b*c/d=e&f~g +été 日本";
        let p = Params::from_pairs([("Action", "X"), ("Tag.1.Value", value)]);
        let parsed = Params::parse(p.encode().as_bytes());
        assert_eq!(parsed.get("Tag.1.Value"), Some(value));
        assert_eq!(parsed, p);
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
}
