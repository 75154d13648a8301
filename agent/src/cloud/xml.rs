//! Just enough XML for EC2 answers: a small element tree, read with
//! quick-xml, and lookups by child name. Namespaces are ignored.

use quick_xml::{events::Event, Reader};

/// Deepest element nesting accepted. EC2 answers nest fewer than ten
/// levels; the tree is dropped, compared and searched recursively, so an
/// answer nested without bound (a broken or hostile endpoint) would exhaust
/// the stack.
pub const MAX_DEPTH: usize = 64;

/// One element: its local name, its text and its children.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    /// Local name (no namespace prefix).
    pub name: String,
    /// Text directly inside, trimmed.
    pub text: String,
    /// Child elements in order.
    pub children: Vec<Element>,
}

impl Element {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The text of the child at `path` (names separated by `/`).
    pub fn text_at(&self, path: &str) -> Option<&str> {
        let mut at = self;
        for part in path.split('/') {
            at = at.child(part)?;
        }
        Some(at.text.as_str())
    }

    /// The `item` children of the child `set` (EC2's list shape).
    pub fn items<'a>(&'a self, set: &str) -> impl Iterator<Item = &'a Element> {
        self.child(set)
            .into_iter()
            .flat_map(|s| s.children.iter().filter(|c| c.name == "item"))
    }

    /// Every descendant named `name`, depth first.
    pub fn find_all<'a>(&'a self, name: &str, out: &mut Vec<&'a Element>) {
        for c in &self.children {
            if c.name == name {
                out.push(c);
            }
            c.find_all(name, out);
        }
    }
}

/// Parses a document into its root element; elements nested deeper than
/// [`MAX_DEPTH`] are an error.
pub fn parse(text: &str) -> Result<Element, String> {
    let mut reader = Reader::from_str(text);
    reader.config_mut().trim_text(true);
    // The document node, then each open element: a new element's depth is
    // the stack's length (the root element's is 1).
    let mut stack: Vec<Element> = vec![Element::default()];
    let too_deep = |reader: &Reader<&[u8]>| {
        format!(
            "at byte {}: elements nested deeper than {MAX_DEPTH} levels",
            reader.buffer_position()
        )
    };
    loop {
        match reader.read_event() {
            Ok(Event::Start(_) | Event::Empty(_)) if stack.len() > MAX_DEPTH => {
                return Err(too_deep(&reader));
            }
            Ok(Event::Start(e)) => stack.push(Element {
                name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
                ..Element::default()
            }),
            Ok(Event::Empty(e)) => {
                let el = Element {
                    name: String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
                    ..Element::default()
                };
                if let Some(parent) = stack.last_mut() {
                    parent.children.push(el);
                }
            }
            Ok(Event::Text(t)) => {
                let s = t.unescape().map_err(|e| e.to_string())?;
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&s);
                }
            }
            Ok(Event::CData(t)) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Ok(Event::End(_)) => {
                let done = stack.pop().ok_or("unbalanced end tag")?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(done),
                    None => return Err("unbalanced end tag".into()),
                }
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("at byte {}: {e}", reader.error_position())),
        }
    }
    if stack.len() != 1 {
        return Err("document ends inside an element".into());
    }
    let mut root = stack.pop().unwrap_or_default();
    match root.children.len() {
        1 => Ok(root.children.remove(0)),
        n => Err(format!("expected one root element, found {n}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ec2_shapes() {
        let doc = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeX xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r-1</requestId>
  <set><item><id>a&amp;b</id></item><item><id>c</id><empty/></item></set>
</DescribeX>"#;
        let root = parse(doc).unwrap();
        assert_eq!(root.name, "DescribeX");
        assert_eq!(root.text_at("requestId"), Some("r-1"));
        let ids: Vec<_> = root.items("set").filter_map(|i| i.text_at("id")).collect();
        assert_eq!(ids, ["a&b", "c"]);
        let mut all = Vec::new();
        root.find_all("id", &mut all);
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn nesting_is_limited() {
        let nested = |depth: usize, leaf: &str| {
            format!("{}{leaf}{}", "<a>".repeat(depth), "</a>".repeat(depth))
        };
        let mut at = parse(&nested(MAX_DEPTH, "")).unwrap();
        for _ in 1..MAX_DEPTH {
            at = at.children.remove(0);
        }
        assert_eq!((at.name.as_str(), at.children.len()), ("a", 0));
        assert!(parse(&nested(MAX_DEPTH - 1, "<b/>")).is_ok());
        // The reader stands after the tag that goes too deep: 65 "<a>" are
        // 195 bytes, 64 "<a>" and "<b/>" 196.
        assert_eq!(
            parse(&nested(MAX_DEPTH + 1, "")),
            Err("at byte 195: elements nested deeper than 64 levels".to_owned())
        );
        assert_eq!(
            parse(&nested(MAX_DEPTH, "<b/>")),
            Err("at byte 196: elements nested deeper than 64 levels".to_owned())
        );
        // Far deeper than any stack could hold as a tree.
        assert_eq!(
            parse(&nested(100_000, "")),
            Err("at byte 195: elements nested deeper than 64 levels".to_owned())
        );
    }

    #[test]
    fn rejects_broken_documents() {
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("<a>").is_err());
        assert!(parse("").is_err());
    }
}
