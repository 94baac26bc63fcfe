//! A located YAML tree built from saphyr-parser's events, so validation can point at every bad node.
//!
//! We keep our own small tree (instead of deserialising with serde) because serde stops at the first
//! error, and `warden check` must list every problem in a file at once. Scalars stay text: the loader
//! decides what `15m` or `10.0.0.5:5432` means.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A 1-based line and column, as printed in `file:line:col`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    fn of(span: Span) -> Self {
        Self { line: span.start.line(), col: span.start.col() + 1 }
    }
}

#[derive(Debug, Clone)]
pub enum Value {
    /// Text as written; `plain` is false for quoted and block scalars.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in file order; duplicate keys are kept (the loader reports them).
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

impl Node {
    /// A null (`~`, `null`, or nothing at all) written where a value was expected.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn kind(&self) -> &'static str {
        match &self.value {
            _ if self.is_null() => "nothing",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Why a file could not be read as YAML at all; only the first such problem per file can be known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses one YAML document. An empty file is `None`.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::default();
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| SyntaxError {
            pos: Pos { line: e.marker().line(), col: e.marker().col() + 1 },
            message: format!("invalid YAML: {}", e.info()),
        })?;
        builder.push(event, span)?;
    }
    Ok(builder.root)
}

enum Open {
    Seq(Pos, Vec<Node>, usize),
    Map(Pos, Vec<(Node, Node)>, Option<Node>, usize),
}

/// The most nodes aliases may copy into one file's tree (a guard against "billion laughs").
const MAX_ALIASED_NODES: usize = 100_000;

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    root: Option<Node>,
    /// Anchored nodes and their sizes in nodes.
    anchors: HashMap<usize, (Node, usize)>,
    aliased: usize,
    documents: usize,
}

fn size(node: &Node) -> usize {
    1 + match &node.value {
        Value::Scalar { .. } => 0,
        Value::Seq(items) => items.iter().map(size).sum(),
        Value::Map(entries) => entries.iter().map(|(k, v)| size(k) + size(v)).sum(),
    }
}

impl Builder {
    fn push(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let pos = Pos::of(span);
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(SyntaxError {
                        pos,
                        message:
                            "a policy file holds one YAML document; split the others into their own files"
                                .into(),
                    });
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = matches!(style, ScalarStyle::Plain);
                self.finish(Node { pos, value: Value::Scalar { text: text.into_owned(), plain } }, anchor);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Open::Seq(pos, Vec::new(), anchor)),
            Event::MappingStart(anchor, _) => self.stack.push(Open::Map(pos, Vec::new(), None, anchor)),
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Open::Seq(p, items, anchor)) => {
                    self.finish(Node { pos: p, value: Value::Seq(items) }, anchor);
                }
                Some(Open::Map(p, entries, _, anchor)) => {
                    self.finish(Node { pos: p, value: Value::Map(entries) }, anchor);
                }
                None => {}
            },
            Event::Alias(id) => {
                let Some((node, n)) = self.anchors.get(&id).cloned() else {
                    return Err(SyntaxError {
                        pos,
                        message: "alias names no anchor defined before it".into(),
                    });
                };
                self.aliased += n;
                if self.aliased > MAX_ALIASED_NODES {
                    return Err(SyntaxError {
                        pos,
                        message: format!(
                            "aliases expand to more than {MAX_ALIASED_NODES} nodes; write the policy out"
                        ),
                    });
                }
                self.finish(Node { pos, ..node }, 0);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
        Ok(())
    }

    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, (node.clone(), size(&node)));
        }
        match self.stack.last_mut() {
            Some(Open::Seq(_, items, _)) => items.push(node),
            Some(Open::Map(_, entries, key, _)) => match key.take() {
                Some(k) => entries.push((k, node)),
                None => *key = Some(node),
            },
            None => self.root = Some(node),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_carry_their_position() {
        let root = parse("a:\n  b: [x, 'y']\n").unwrap().unwrap();
        let Value::Map(entries) = &root.value else { panic!() };
        assert_eq!(entries[0].0.pos, Pos { line: 1, col: 1 });
        let Value::Map(inner) = &entries[0].1.value else { panic!() };
        assert_eq!(inner[0].0.pos, Pos { line: 2, col: 3 });
        let Value::Seq(items) = &inner[0].1.value else { panic!() };
        assert_eq!(items[1].pos, Pos { line: 2, col: 10 });
        assert!(matches!(&items[1].value, Value::Scalar { plain: false, .. }));
    }

    #[test]
    fn duplicate_keys_are_kept_for_the_loader() {
        let root = parse("a: 1\na: 2\n").unwrap().unwrap();
        let Value::Map(entries) = &root.value else { panic!() };
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.message.starts_with("invalid YAML"), "{err:?}");
        assert!(err.pos.line >= 1);
    }

    #[test]
    fn aliases_resolve_and_empty_files_are_none() {
        let root = parse("a: &x [1]\nb: *x\n").unwrap().unwrap();
        let Value::Map(entries) = &root.value else { panic!() };
        assert!(matches!(&entries[1].1.value, Value::Seq(v) if v.len() == 1));
        assert!(parse("").unwrap().is_none());
        assert!(parse("---\n").unwrap().is_some_and(|n| n.is_null()));
    }

    #[test]
    fn alias_bombs_are_refused() {
        use std::fmt::Write as _;
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let p = i - 1;
            let refs = vec![format!("*a{p}"); 10].join(", ");
            let _ = writeln!(text, "a{i}: &a{i} [{refs}]");
        }
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("aliases expand"), "{err:?}");
    }
}
