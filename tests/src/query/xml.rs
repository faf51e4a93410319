//! Reading EC2's XML responses (children, paths, `<item>` lists) and rewriting them in place by
//! byte range, so the rest of the document stays exactly as moto wrote it.

use std::ops::Range;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
