//! A small, strict reader of the Prometheus text exposition format (0.0.4, and OpenMetrics text's
//! `# EOF`), for tests that scrape `/metrics`: every line must be a comment or a well-formed sample of a
//! family declared by a `# TYPE` line before it, and every histogram must be cumulative with a `+Inf`
//! bucket equal to its count. Shared by the in-process and privileged tests (`#[path]`).

#![allow(dead_code, reason = "each test uses a different part")]

use std::collections::BTreeMap;

/// One histogram series' labels (without `le`) and its buckets (`le`, cumulative count).
type Series = BTreeMap<Vec<(String, String)>, Vec<(f64, f64)>>;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
    pub eof: bool,
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("`{s}` is not a number")),
    }
}

/// `{a="x",b="y\"z"}` from the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let (key, r) = rest.split_once("=\"").ok_or_else(|| format!("bad label in `{s}`"))?;
        if !valid_name(key) {
            return Err(format!("bad label name `{key}`"));
        }
        let mut value = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in `{s}`")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated label value in `{s}`")),
            }
        };
        if labels.insert(key.to_owned(), value).is_some() {
            return Err(format!("duplicate label `{key}`"));
        }
        rest = &r[end + 1..];
    }
}

/// The family a sample name belongs to, given the declared types.
fn family<'a>(types: &BTreeMap<String, String>, name: &'a str) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_total", "_created", "_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.contains_key(base)
        {
            return Some(base);
        }
    }
    None
}

pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: `{line}`", n + 1);
        if out.eof {
            return Err(at("content after # EOF".into()));
        }
        if line == "# EOF" {
            out.eof = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name) {
                        return Err(at("bad metric name".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped", "unknown", "info", "stateset"]
                        .contains(&kind)
                    {
                        return Err(at(format!("unknown type `{kind}`")));
                    }
                    if out.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("family declared twice".into()));
                    }
                }
                (Some("HELP" | "UNIT"), Some(name), _) if valid_name(name) => {}
                _ => return Err(at("unknown comment".into())),
            }
            continue;
        }
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(at("bad metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<f64>().map_err(|_| at("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        if family(&out.types, name).is_none() {
            return Err(at("sample of a family with no # TYPE line before it".into()));
        }
        out.samples.push(Sample { name: name.to_owned(), labels, value });
    }
    out.check_histograms()?;
    Ok(out)
}

impl Exposition {
    /// Every histogram's buckets are cumulative, and `+Inf` equals `_count`.
    fn check_histograms(&self) -> Result<(), String> {
        for (name, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let bucket = format!("{name}_bucket");
            let mut series: Series = BTreeMap::new();
            for s in self.samples.iter().filter(|s| s.name == bucket) {
                let le = parse_value(s.labels.get("le").ok_or(format!("{bucket} without le"))?)?;
                let key: Vec<(String, String)> = s
                    .labels
                    .iter()
                    .filter(|(k, _)| *k != "le")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                series.entry(key).or_default().push((le, s.value));
            }
            for (labels, buckets) in series {
                if buckets.windows(2).any(|w| w[0].0 >= w[1].0 || w[0].1 > w[1].1) {
                    return Err(format!("{bucket}{labels:?}: buckets not cumulative: {buckets:?}"));
                }
                let inf = buckets.last().filter(|b| b.0.is_infinite()).ok_or(format!("{bucket}: no +Inf"))?;
                let wanted: BTreeMap<String, String> = labels.into_iter().collect();
                let count = self
                    .samples
                    .iter()
                    .find(|s| s.name == format!("{name}_count") && s.labels == wanted)
                    .ok_or(format!("{name}: no _count"))?;
                if (count.value - inf.1).abs() > f64::EPSILON {
                    return Err(format!("{name}: +Inf bucket {} != count {}", inf.1, count.value));
                }
            }
        }
        Ok(())
    }

    /// The sum of every sample named `name` whose labels include all of `labels`; `None` if none does.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }
}
