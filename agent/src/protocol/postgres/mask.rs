//! STUB: replaced by the pgsql branch
//!
//! Column masking for PostgreSQL sessions: which result columns carry a masked column (by the table OID and
//! attribute number in RowDescription), and what replaces their values.

/// The masked columns resolved against the upstream catalog: (table oid, attnum) pairs, and bare names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskSet {
    pub columns: Vec<(u32, i16)>,
    pub names: Vec<String>,
}

/// For each RowDescription field (table oid, column attnum, name, type oid), whether to mask it.
pub fn masked_fields(fields: &[(u32, i16, &str, u32)], set: &MaskSet) -> Vec<bool> {
    fields
        .iter()
        .map(|&(table, column, name, _)| {
            (table != 0 && set.columns.contains(&(table, column)))
                || (table == 0 && set.names.iter().any(|n| n.eq_ignore_ascii_case(name)))
        })
        .collect()
}

/// The bytes that replace a masked value of `type_oid` in `format` (0 text, 1 binary); None = send NULL.
pub fn replacement(type_oid: u32, format: i16) -> Option<&'static [u8]> {
    match (type_oid, format) {
        // text, varchar, bpchar, name, unknown: the same bytes in both formats.
        (25 | 1043 | 1042 | 19 | 705, _) => Some(b"***"),
        (21 | 23 | 20, 0) => Some(b"0"),
        (21, _) => Some(&[0; 2]),
        (23, _) => Some(&[0; 4]),
        (20, _) => Some(&[0; 8]),
        _ => None,
    }
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// SQL that resolves mask entries to (table oid, attnum) on the upstream (run once per session/pool conn).
/// Its rows are two columns, the table OID and the attribute number.
pub fn resolve_query(mask: &[String]) -> String {
    let mut conds: Vec<String> = Vec::new();
    for m in mask {
        match m.split_once('.') {
            Some((t, c)) => {
                conds.push(format!("(c.relname = {} AND a.attname = {})", literal(t), literal(c)));
            }
            None => conds.push(format!("a.attname = {}", literal(m))),
        }
    }
    if conds.is_empty() {
        conds.push("false".into());
    }
    format!(
        "SELECT a.attrelid::oid, a.attnum FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = \
         a.attrelid WHERE a.attnum > 0 AND NOT a.attisdropped AND ({})",
        conds.join(" OR ")
    )
}
