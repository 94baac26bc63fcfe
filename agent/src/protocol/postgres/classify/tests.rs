use super::*;

mod battery {
    include!("battery.rs");
}

const MASK: &[&str] = &["email", "customers.phone"];

fn mask() -> Vec<String> {
    MASK.iter().map(ToString::to_string).collect()
}

fn check(sql: &str, access: Access, mask: &[String]) -> Result<Checked, Refused> {
    let c = Classifier::new(64);
    let mut state = SessionState::new(["customer_emails".to_string()]);
    c.check_session(sql, access, mask, &mut state).map(Arc::unwrap_or_clone)
}

#[test]
fn every_read_is_allowed_under_read() {
    let mut failures = Vec::new();
    for sql in battery::READS {
        if let Err(e) = check(sql, Access::Read, &[]) {
            failures.push(format!("{sql}\n    -> {} {}", e.sqlstate, e.message));
        }
    }
    assert!(failures.is_empty(), "reads refused:\n{}", failures.join("\n"));
}

#[test]
fn psql_catalog_queries_are_allowed_under_read() {
    let queries = include_str!("psql_queries.sql");
    let mut n = 0;
    for q in queries.split("\n----\n").map(str::trim).filter(|q| !q.is_empty()) {
        n += 1;
        let r = check(q, Access::Read, &[]);
        assert!(r.is_ok(), "{q}\n -> {r:?}");
    }
    assert!(n >= 10, "only {n} psql queries");
}

#[test]
fn every_write_is_refused_under_read() {
    let mut failures = Vec::new();
    for sql in battery::WRITES {
        match check(sql, Access::Read, &[]) {
            Ok(c) => failures.push(format!("{sql}\n    -> allowed as {:?}", c.tags)),
            Err(e) if e.sqlstate == READ_ONLY || e.sqlstate == PRIVILEGE => {}
            Err(e) => failures.push(format!("{sql}\n    -> {} {}", e.sqlstate, e.message)),
        }
    }
    assert!(failures.is_empty(), "writes not refused with 25006/42501:\n{}", failures.join("\n"));
}

#[test]
fn writes_pass_under_write_except_what_leaves_control() {
    for sql in [
        "INSERT INTO orders (item) VALUES ('x')",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
        "SELECT nextval('s'), evil()",
        "DO $$BEGIN END$$",
        "CREATE TABLE t (x int)",
        "SET default_transaction_read_only = off",
        "SELECT set_config('statement_timeout', '1s', false)",
        "BEGIN READ WRITE",
        "EXECUTE anything",
        "SET myapp.tenant = '2'",
        "SELECT * FROM orders FOR UPDATE",
    ] {
        assert!(check(sql, Access::Write, &[]).is_ok(), "{sql}: {:?}", check(sql, Access::Write, &[]));
    }
    for sql in [
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION postgres",
        "SELECT set_config('role', 'postgres', false)",
        "SELECT set_config(current_user, 'x', false)",
        "SET client_encoding = 'SJIS'",
        "SET standard_conforming_strings = off",
        "CREATE ROLE intruder LOGIN PASSWORD 'x'",
        "ALTER ROLE postgres PASSWORD 'x'",
        "DROP ROLE x",
        "ALTER SYSTEM SET work_mem = '1MB'",
        "LOAD 'auto_explain'",
        "COPY orders FROM '/etc/passwd'",
        "COPY orders TO PROGRAM 'sh'",
        "SELECT 1; SET ROLE postgres",
        "GRANT pg_write_all_data TO readonly_login",
    ] {
        let e = check(sql, Access::Write, &[]).expect_err(sql);
        assert_eq!(e.sqlstate, PRIVILEGE, "{sql}: {e}");
    }
}

#[test]
fn unparsable_and_nul_are_syntax_errors() {
    for sql in ["SELEC 1", "SELECT (", "SELECT 'unterminated", "SELECT 1\0; DELETE FROM orders", "SELECT $$x"]
    {
        let e = check(sql, Access::Write, &[]).expect_err(sql);
        assert_eq!(e.sqlstate, SYNTAX, "{sql}: {e}");
    }
    // PostgreSQL-only syntax the parser knows (dollar quotes, nested comments) parses.
    assert!(check("SELECT $x$ $y$ $x$ /* a /* b */ c */", Access::Read, &[]).is_ok());
}

#[test]
fn multi_statement_strings_are_checked_whole() {
    let c = check("SELECT 1; SHOW search_path; BEGIN READ ONLY; COMMIT", Access::Read, &[]).unwrap();
    assert_eq!(c.statements, 4);
    assert_eq!(c.tags, ["SELECT", "SHOW", "BEGIN", "COMMIT"]);
    let e = check("SELECT 1; SELECT 2; UPDATE orders SET qty = 1", Access::Read, &[]).unwrap_err();
    assert_eq!(e.sqlstate, READ_ONLY);
    assert!(e.message.contains("UPDATE"), "{e}");
    let empty = check("-- nothing\n", Access::Read, &[]).unwrap();
    assert_eq!(empty.statements, 0);
}

#[test]
fn refusals_name_what_was_refused() {
    let e = check("SELECT pg_catalog.set_config('a.b', 'c', false)", Access::Read, &[]).unwrap_err();
    assert!(e.message.contains("\"a.b\""), "{e}");
    let e = check("SELECT * FROM orders FOR UPDATE", Access::Read, &[]).unwrap_err();
    assert!(e.message.contains("FOR UPDATE"), "{e}");
    let e = check("SELECT upper(email) FROM customers", Access::Write, &mask()).unwrap_err();
    assert!(e.message.contains("\"email\"") && e.message.contains("function"), "{e}");
    let e = check("SELECT id FROM customers WHERE email LIKE 'a%'", Access::Write, &mask()).unwrap_err();
    assert!(e.message.contains("WHERE"), "{e}");
}

#[test]
fn masked_columns_are_refused_in_every_disguise() {
    let mut failures = Vec::new();
    for sql in battery::MASK_REFUSED.iter().chain(battery::MASK_REFUSED_WRITE) {
        match check(sql, Access::Write, &mask()) {
            Ok(c) => failures.push(format!("{sql}\n    -> allowed, masks {:?}", c.masks_applied)),
            Err(e) if e.sqlstate == PRIVILEGE => {}
            Err(e) => failures.push(format!("{sql}\n    -> {} {}", e.sqlstate, e.message)),
        }
    }
    for sql in battery::MASK_REFUSED {
        if check(sql, Access::Read, &mask()).is_ok() {
            failures.push(format!("{sql}\n    -> allowed under read"));
        }
    }
    assert!(failures.is_empty(), "mask disguises not refused:\n{}", failures.join("\n"));
}

#[test]
fn plain_masked_columns_pass_and_are_noted() {
    let mut failures = Vec::new();
    for sql in battery::MASK_ALLOWED {
        for access in [Access::Read, Access::Write] {
            if let Err(e) = check(sql, access, &mask()) {
                failures.push(format!("{sql} ({access:?})\n    -> {} {}", e.sqlstate, e.message));
            }
        }
    }
    for sql in battery::MASK_ALLOWED_WRITE {
        if let Err(e) = check(sql, Access::Write, &mask()) {
            failures.push(format!("{sql}\n    -> {} {}", e.sqlstate, e.message));
        }
    }
    assert!(failures.is_empty(), "plain masked selects refused:\n{}", failures.join("\n"));
    let c = check("SELECT id, email AS e FROM customers", Access::Read, &mask()).unwrap();
    assert_eq!(c.masks_applied, ["email"]);
    let c = check("SELECT * FROM customers", Access::Read, &mask()).unwrap();
    assert_eq!(c.masks_applied, ["customers.phone", "email"]);
    let c = check("SELECT * FROM orders", Access::Read, &mask()).unwrap();
    assert_eq!(c.masks_applied, ["email"], "a bare mask may apply to any table");
    let c = check("SELECT id FROM customers", Access::Read, &mask()).unwrap();
    assert!(c.masks_applied.is_empty());
}

#[test]
fn tainted_views_are_refused_only_under_masks() {
    let c = Classifier::new(8);
    let mut state = SessionState::new(["Reporting_View".to_string()]);
    let e = c.check_session("SELECT id FROM reporting_view", Access::Read, &mask(), &mut state).unwrap_err();
    assert_eq!(e.sqlstate, PRIVILEGE);
    assert!(c.check_session("SELECT id FROM reporting_view", Access::Read, &[], &mut state).is_ok());
    // Without the session's resolution, the same text under the same masks is a different cache entry.
    assert!(c.check("SELECT id FROM reporting_view", Access::Read, &mask()).is_ok());
}

#[test]
fn execute_needs_a_prepare_seen_in_this_session() {
    let c = Classifier::new(8);
    let mut state = SessionState::default();
    let e = c.check_session("EXECUTE q", Access::Read, &[], &mut state).unwrap_err();
    assert_eq!(e.sqlstate, READ_ONLY);
    c.check_session("PREPARE q AS SELECT 1", Access::Read, &[], &mut state).unwrap();
    c.check_session("EXECUTE q", Access::Read, &[], &mut state).unwrap();
    // A refused string changes nothing: its PREPARE is not remembered.
    let mut state2 = state.clone();
    assert!(
        c.check_session("PREPARE r AS SELECT 1; DELETE FROM orders", Access::Read, &[], &mut state2).is_err()
    );
    assert!(c.check_session("EXECUTE r", Access::Read, &[], &mut state2).is_err());
    c.check_session("DEALLOCATE q", Access::Read, &[], &mut state).unwrap();
    assert!(c.check_session("EXECUTE q", Access::Read, &[], &mut state).is_err());
    c.check_session("PREPARE q AS SELECT 1", Access::Read, &[], &mut state).unwrap();
    c.check_session("DISCARD ALL", Access::Read, &[], &mut state).unwrap();
    assert!(c.check_session("EXECUTE q", Access::Read, &[], &mut state).is_err());
    c.check_session("PREPARE q AS SELECT 1", Access::Read, &[], &mut state).unwrap();
    state.reset();
    assert!(c.check_session("EXECUTE q", Access::Read, &[], &mut state).is_err());
    // Extended-protocol names share the namespace.
    state.parsed("s1");
    c.check_session("EXECUTE s1", Access::Read, &[], &mut state).unwrap();
    state.closed("s1");
    assert!(c.check_session("EXECUTE s1", Access::Read, &[], &mut state).is_err());
    // The plain `check` has no session: EXECUTE is refused under read, allowed under write.
    assert!(c.check("EXECUTE q", Access::Read, &[]).is_err());
    assert!(c.check("EXECUTE q", Access::Write, &[]).is_ok());
    assert!(c.check("EXECUTE q", Access::Write, &mask()).is_err());
}

#[test]
fn the_cache_is_bounded_and_keyed_by_access_and_masks() {
    let c = Classifier::new(4);
    // Column names, not constants: twenty strings of twenty shapes.
    for i in 0..20 {
        c.check(&format!("SELECT c{i} FROM t"), Access::Read, &[]).unwrap();
    }
    assert!(c.cached() <= 8, "{} cached", c.cached());
    assert!(c.check("DELETE FROM orders", Access::Read, &[]).is_err());
    assert!(c.check("DELETE FROM orders", Access::Write, &[]).is_ok());
    assert!(c.check("SELECT upper(email) FROM customers", Access::Read, &[]).is_ok());
    assert!(c.check("SELECT upper(email) FROM customers", Access::Read, &mask()).is_err());
    // A hot entry survives generations.
    for i in 0..20 {
        c.check("SELECT 'hot'", Access::Read, &[]).unwrap();
        c.check(&format!("SELECT d{i}, 1"), Access::Read, &[]).unwrap();
    }
    let before = c.cached();
    c.check("SELECT 'hot'", Access::Read, &[]).unwrap();
    assert_eq!(c.cached(), before);
}

#[test]
fn startup_parameters_follow_the_set_rules() {
    let ok: &[(&str, &str)] = &[
        ("user", "agent"),
        ("database", "orders"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("extra_float_digits", "3"),
        ("options", "-c statement_timeout=5s --search-path=public"),
    ];
    check_startup(ok, Access::Read).unwrap();
    for bad in [
        ("client_encoding", "SJIS"),
        ("options", "-c default_transaction_read_only=off"),
        ("options", "-cdefault_transaction_read_only=off"),
        ("options", "--role=postgres"),
        ("options", "-c standard_conforming_strings=off"),
        ("options", "-B 100"),
        ("replication", "database"),
        ("session_authorization", "postgres"),
        ("search_path", "pg_catalog,public"),
    ] {
        assert!(check_startup(&[bad], Access::Read).is_err(), "{bad:?}");
    }
    check_startup(&[("options", "-c default_transaction_read_only=off")], Access::Write).unwrap();
    assert!(check_startup(&[("client_encoding", "BIG5")], Access::Write).is_err());
    assert!(check_startup(&[("replication", "true")], Access::Write).is_err());
}

#[test]
fn every_list_is_lowercase_and_unique() {
    for list in [FUNCTIONS, TYPES, READ_SETTINGS, VALUE_EXPOSING_RELATIONS] {
        let mut seen = HashSet::new();
        for name in list {
            assert_eq!(*name, name.to_lowercase(), "{name}");
            assert!(seen.insert(name), "{name} twice");
        }
    }
    for dangerous in [
        "nextval",
        "setval",
        "set_config",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "lo_import",
        "lo_create",
        "dblink",
        "dblink_exec",
        "pg_read_file",
        "query_to_xml",
        "pg_advisory_lock",
        "pg_notify",
        "txid_current",
        "ts_stat",
        "ts_rewrite",
        "pg_stat_get_activity",
    ] {
        assert!(!FUNCTIONS.contains(&dangerous), "{dangerous} is on the allow-list");
    }
}

#[test]
fn the_fixture_parses_and_is_a_write() {
    let c = check(battery::FIXTURE, Access::Write, &[]).unwrap();
    assert!(c.statements >= 8, "{c:?}");
    assert!(check(battery::FIXTURE, Access::Read, &[]).is_err());
}

#[test]
fn shadowed_builtins_must_be_spelled_in_pg_catalog() {
    let c = Classifier::new(8);
    let mut state = SessionState::default().with_shadowed(["upper".to_string(), "=".to_string()]);
    let e = c.check_session("SELECT upper(name) FROM customers", Access::Read, &[], &mut state).unwrap_err();
    assert!(e.message.contains("pg_catalog.upper()"), "{e}");
    assert!(
        c.check_session("SELECT pg_catalog.upper(name) FROM customers", Access::Read, &[], &mut state)
            .is_ok()
    );
    assert!(c.check_session("SELECT 1 WHERE 1 = 1", Access::Read, &[], &mut state).is_err());
    assert!(
        c.check_session("SELECT 1 WHERE 1 OPERATOR(pg_catalog.=) 1", Access::Read, &[], &mut state).is_ok()
    );
    assert!(c.check_session("SELECT upper(name) FROM customers", Access::Write, &[], &mut state).is_ok());
    assert!(c.check("SELECT upper(name) FROM customers", Access::Read, &[]).is_ok());
    assert!(pg_query::parse(&shadow_query(), 0).is_ok());
    assert!(classify(&shadow_query(), Access::Read, &[], &[], &[]).is_ok());
}

#[test]
fn explain_analyze_in_any_spelling_is_refused() {
    for sql in [
        "EXPLAIN ANALYSE SELECT 1",
        "EXPLAIN (ANALYSE) SELECT 1",
        "EXPLAIN (ANALYZE tr) SELECT 1",
        "EXPLAIN (ANALYZE 'yes') SELECT 1",
        "EXPLAIN (ANALYZE 1) SELECT 1",
        "EXPLAIN (\"analyze\") SELECT 1",
    ] {
        assert!(check(sql, Access::Read, &[]).is_err(), "{sql}");
    }
    for sql in
        ["EXPLAIN (ANALYZE fal) SELECT 1", "EXPLAIN (ANALYZE off) SELECT 1", "EXPLAIN (ANALYZE 0) SELECT 1"]
    {
        assert!(check(sql, Access::Read, &[]).is_ok(), "{sql}");
    }
}

#[test]
fn positions_inside_grouping_sets_count_under_masks() {
    for sql in [
        "SELECT email, count(*) FROM customers GROUP BY GROUPING SETS ((1), ())",
        "SELECT email, count(*) FROM customers GROUP BY ROLLUP (1)",
    ] {
        assert!(check(sql, Access::Read, &mask()).is_err(), "{sql}");
    }
}

#[test]
fn parameter_status_must_keep_the_lexer_settings() {
    assert!(check_parameter_status("client_encoding", "UTF8", Access::Write, "u").is_ok());
    assert!(check_parameter_status("standard_conforming_strings", "on", Access::Write, "u").is_ok());
    assert!(check_parameter_status("TimeZone", "UTC", Access::Write, "u").is_ok());
    assert!(check_parameter_status("client_encoding", "SJIS", Access::Write, "u").is_err());
    assert!(check_parameter_status("standard_conforming_strings", "off", Access::Write, "u").is_err());
    // A read session's default must stay read-only; the authorization must stay the login's.
    assert!(check_parameter_status("default_transaction_read_only", "on", Access::Read, "u").is_ok());
    assert!(check_parameter_status("default_transaction_read_only", "off", Access::Write, "u").is_ok());
    let lifted = check_parameter_status("default_transaction_read_only", "off", Access::Read, "u");
    assert_eq!(lifted.unwrap_err().sqlstate, READ_ONLY);
    assert!(check_parameter_status("session_authorization", "u", Access::Write, "u").is_ok());
    assert!(check_parameter_status("session_authorization", "postgres", Access::Write, "u").is_err());
    assert!(check("ALTER DATABASE postgres SET search_path = evil, pg_catalog", Access::Write, &[]).is_err());
}

#[test]
fn quoted_names_are_other_objects() {
    for sql in [
        "SELECT \"LOWER\"('x')",
        "SELECT \"PG_CATALOG\".lower('x')",
        "SELECT 1::\"INT4\"",
        "SELECT 'x'::\"PG_CATALOG\".text",
        "SELECT \"Now\"()",
    ] {
        assert!(check(sql, Access::Read, &[]).is_err(), "{sql}");
    }
    assert!(
        check("SELECT LOWER('x'), \"lower\"('y'), PG_CATALOG.UPPER('z'), 1::INT4", Access::Read, &[]).is_ok()
    );
}

#[test]
fn deep_trees_are_refused_not_crashed() {
    for n in [150, 5000] {
        let sql = format!("SELECT {}1", "1 + ".repeat(n));
        let r = check(&sql, Access::Read, &[]);
        if let Err(e) = &r {
            assert_eq!(e.sqlstate, SYNTAX, "{n}: {e}");
        }
        let sql = format!("SELECT {}1{}", "(SELECT ".repeat(n), ")".repeat(n));
        if let Err(e) = check(&sql, Access::Read, &[]) {
            assert_eq!(e.sqlstate, SYNTAX, "{n}: {e}");
        }
    }
    // Long flat lists are fine.
    let sql = format!("SELECT 1 WHERE 1 IN ({})", vec!["1"; 5000].join(", "));
    assert!(check(&sql, Access::Read, &[]).is_ok());
}

#[test]
fn newer_read_syntax_is_allowed() {
    // PostgreSQL 16-18 syntax (the parser's grammar is 18's; the test server is 15).
    for sql in [
        "SELECT * FROM JSON_TABLE('[1, 2]', '$[*]' COLUMNS (a int PATH '$')) AS jt",
        "SELECT JSON_OBJECT('a': 1), JSON_ARRAY(1, 2), '{}' IS JSON OBJECT",
        "SELECT JSON_EXISTS('{\"a\": 1}', '$.a'), JSON_VALUE('{\"a\": 1}', '$.a' RETURNING int)",
        "SELECT JSON_QUERY('{\"a\": [1]}', '$.a' WITH WRAPPER)",
        "SELECT JSON_OBJECTAGG(k: v), JSON_ARRAYAGG(v ORDER BY v) FROM (VALUES ('a', 1)) t(k, v)",
        "SELECT GROUPING(id), count(*) FROM customers GROUP BY ROLLUP (id)",
        "SELECT any_value(name) FROM customers",
        "SELECT * FROM XMLTABLE('/r/c' PASSING CAST('<r><c>1</c></r>' AS xml) COLUMNS c int PATH '.')",
    ] {
        let r = check(sql, Access::Read, &[]);
        assert!(r.is_ok(), "{sql}: {r:?}");
    }
    for sql in [
        "SELECT pg_input_is_valid('1', 'posint')",
        "SELECT * FROM JSON_TABLE('[1]', '$[*]' COLUMNS (a posint PATH '$')) AS jt",
        "SELECT JSON_VALUE('1', '$' RETURNING posint)",
    ] {
        assert!(check(sql, Access::Read, &[]).is_err(), "{sql}");
    }
}

#[test]
fn fastpath_calls_are_held_to_the_function_allow_list() {
    let read = Access::Read;
    check_function_call(Some(("pg_catalog", "reverse")), read, false).unwrap();
    check_function_call(Some(("pg_catalog", "reverse")), read, true).unwrap();
    for f in [
        ("pg_catalog", "nextval"),
        ("pg_catalog", "lo_open"),
        ("public", "reverse"),
        ("pg_catalog", "set_config"),
    ] {
        assert_eq!(check_function_call(Some(f), read, false).unwrap_err().sqlstate, READ_ONLY, "{f:?}");
    }
    assert_eq!(check_function_call(None, read, false).unwrap_err().sqlstate, READ_ONLY);
    // Under write: anything but set_config, unless masks apply.
    let write = Access::Write;
    check_function_call(Some(("pg_catalog", "lo_open")), write, false).unwrap();
    check_function_call(Some(("public", "bump")), write, false).unwrap();
    assert_eq!(
        check_function_call(Some(("pg_catalog", "set_config")), write, false).unwrap_err().sqlstate,
        PRIVILEGE
    );
    assert_eq!(
        check_function_call(Some(("pg_catalog", "lo_open")), write, true).unwrap_err().sqlstate,
        PRIVILEGE
    );
    check_function_call(Some(("pg_catalog", "reverse")), write, true).unwrap();
}

#[test]
fn an_ascii_client_encoding_is_accepted_at_startup() {
    // psql in the C locale sends SQL_ASCII; the server then checks the bytes as its own encoding.
    check_startup(&[("client_encoding", "SQL_ASCII")], Access::Read).unwrap();
    assert!(check_parameter_status("client_encoding", "SQL_ASCII", Access::Write, "u").is_ok());
}

#[test]
fn strings_differing_only_in_plain_constants_share_a_verdict() {
    let c = Classifier::new(64);
    let mut state = SessionState::default();
    let mut run = |sql: &str| c.check_session(sql, Access::Read, &[], &mut state).map(|k| k.tags.clone());
    assert_eq!(run("SELECT abalance FROM pgbench_accounts WHERE aid = 17;").unwrap(), ["SELECT"]);
    assert_eq!(c.parsed(), 1);
    run("SELECT abalance FROM pgbench_accounts WHERE aid = 982451;").unwrap();
    run("SELECT abalance FROM pgbench_accounts WHERE aid = 0;").unwrap();
    assert_eq!(c.parsed(), 1, "same shape, one parse");
    // Another token kind (numeric, string), other text or whitespace: another shape.
    run("SELECT abalance FROM pgbench_accounts WHERE aid = 1.5;").unwrap();
    run("SELECT abalance FROM pgbench_accounts WHERE aid = '17';").unwrap();
    run("SELECT abalance FROM pgbench_accounts WHERE aid  = 17;").unwrap();
    run("SELECT bbalance FROM pgbench_accounts WHERE aid = 17;").unwrap();
    assert_eq!(c.parsed(), 5);
    // Constants a rule reads, or that are not plain constant nodes, keep strings apart.
    run("SELECT set_config('statement_timeout', '5', false)").unwrap();
    run("SELECT set_config('statement_timeout', '6', false)").unwrap();
    run("EXPLAIN (ANALYZE 0) SELECT 1").unwrap();
    run("EXPLAIN (ANALYZE 00) SELECT 1").unwrap();
    assert_eq!(c.parsed(), 9);
    // Refusals are never shared by shape.
    assert!(run("SELECT nextval('s1')").is_err());
    assert!(run("SELECT nextval('s2')").is_err());
    assert_eq!(c.parsed(), 11);
}

/// A verdict shared by shape must never let through what classifying the string itself refuses: for
/// strings where only a constant makes the difference, the allowed one first, then the refused one, on
/// one classifier.
#[test]
fn a_constant_that_decides_is_never_shared_by_shape() {
    let pairs: &[(&str, &str)] = &[
        ("SET default_transaction_read_only = 'on'", "SET default_transaction_read_only = 'off'"),
        ("SET default_transaction_read_only = 1", "SET default_transaction_read_only = 0"),
        ("SET transaction_read_only = 'on'", "SET transaction_read_only = 'off'"),
        ("SET search_path = 'public'", "SET search_path = 'pg_temp'"),
        ("SELECT set_config('search_path', 'public', false)", "SELECT set_config('role', 'postgres', false)"),
        (
            "SELECT set_config('statement_timeout', '0', false)",
            "SELECT set_config('default_transaction_read_only', 'off', false)",
        ),
        ("EXPLAIN (ANALYZE 0) SELECT 1", "EXPLAIN (ANALYZE 1) SELECT 1"),
        ("EXPLAIN (ANALYZE 'off') SELECT 1", "EXPLAIN (ANALYZE 'on') SELECT 1"),
        ("START TRANSACTION READ ONLY", "START TRANSACTION READ WRITE"),
        (
            "SELECT set_config(name, '0', false) FROM pg_settings WHERE name = 'statement_timeout'",
            "SELECT set_config(name, '0', false) FROM pg_settings WHERE name = 'default_transaction_read_only'",
        ),
    ];
    for access in [Access::Read, Access::Write] {
        for (allowed, refused) in pairs {
            let alone = Classifier::new(64).check(refused, access, &[]);
            let c = Classifier::new(64);
            let first = c.check(allowed, access, &[]);
            let second = c.check(refused, access, &[]);
            assert_eq!(
                alone.is_ok(),
                second.is_ok(),
                "{access:?}: `{refused}` after `{allowed}` ({first:?})"
            );
            if access == Access::Read {
                assert!(first.is_ok(), "{allowed}: {first:?}");
                assert!(second.is_err(), "{refused}");
            }
        }
    }
}

/// The same over the whole battery: every write and masked statement, with its constants rewritten to
/// other values first (warming the shape cache where those are allowed), is still refused.
#[test]
fn the_battery_is_refused_after_its_siblings() {
    let variants: &[(&str, &str)] =
        &[("'on'", "1"), ("'off'", "0"), ("'public'", "2"), ("'x'", "5"), ("'search_path'", "100")];
    let cases = battery::WRITES
        .iter()
        .map(|s| (*s, Vec::new()))
        .chain(battery::MASK_REFUSED.iter().map(|s| (*s, mask())))
        .collect::<Vec<_>>();
    let mut shared = 0;
    for (sql, m) in &cases {
        let constants = constant_tokens(sql);
        if constants.is_empty() {
            continue;
        }
        let c = Classifier::new(64);
        for (string, int) in variants {
            let mut sibling = String::new();
            let mut at = 0;
            for &(start, end, kind) in &constants {
                let (start, end) = (usize::try_from(start).unwrap(), usize::try_from(end).unwrap());
                sibling.push_str(&sql[at..start]);
                let int_kind = kind == Token::Iconst as i32 || kind == Token::Fconst as i32;
                sibling.push_str(if int_kind { int } else { string });
                at = end;
            }
            sibling.push_str(&sql[at..]);
            if c.check(&sibling, Access::Read, m).is_ok() {
                shared += 1;
            }
        }
        assert!(c.check(sql, Access::Read, m).is_err(), "`{sql}` passed after its siblings");
    }
    assert!(shared > 0, "no sibling was allowed: the test shows nothing");
}

/// The plain reader finds exactly the constants PostgreSQL's lexer finds, for every string it reads (and
/// declines the rest): over the battery, psql's own queries and many strings made of fragments that sit
/// on either side of the subset's edges.
#[test]
fn the_plain_reader_agrees_with_the_lexer() {
    let fragments = [
        "SELECT",
        " ",
        "a",
        "b1",
        "_x",
        "1",
        "42",
        "2147483647",
        "2147483648",
        "007",
        "99999999999999999999",
        "'x'",
        "'it''s'",
        "''",
        "'a b'",
        "'a\nb'",
        "(",
        ")",
        ",",
        ";",
        ".",
        "=",
        "<>",
        "<=",
        "::",
        "+",
        "*",
        "\n",
        "\t",
        "\r",
        "e",
        "E",
        "'",
        "1.5",
        ".5",
        "$1",
        "--c\n",
        "/*c*/",
        "\"q\"",
        "U&'x'",
        "x'1f'",
        "b'01'",
        "N'n'",
        "E'\\n'",
        "'a'\n'b'",
        "'a' 'b'",
        "1e5",
        "0x1f",
        "1_000",
        "é",
        "'é'",
        "\\",
        "-",
        "/",
        "$$d$$",
        "[",
        "]",
        "%",
        "^",
        "|",
        "~",
        "!",
        "@",
        "#",
        "?",
        "&",
        "`",
        "\u{b}",
        "\u{c}",
        "1.",
        "..",
        "WHERE",
        "aid",
        "FROM",
        "t",
        "'a\\'",
        "ab'",
        "1'a'",
        "'a'b",
        "x$",
        "_1",
        "9a",
    ];
    let mut corpus: Vec<String> = battery::READS
        .iter()
        .chain(battery::WRITES)
        .chain(battery::MASK_REFUSED)
        .chain(battery::MASK_ALLOWED)
        .map(|s| (*s).to_owned())
        .chain(include_str!("psql_queries.sql").split("\n----\n").map(str::to_owned))
        .collect();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        usize::try_from(seed % 1_000_000).unwrap()
    };
    for _ in 0..20_000 {
        let n = 1 + next() % 10;
        corpus.push((0..n).map(|_| fragments[next() % fragments.len()]).collect());
    }
    let (mut read, mut with_constants) = (0, 0);
    for sql in &corpus {
        if let Some(plain) = plain_constants(sql) {
            assert_eq!(plain, lexed_constants(sql), "{sql:?}");
            read += 1;
            with_constants += usize::from(!plain.is_empty());
        }
    }
    assert!(
        read > 2_000 && with_constants > 500,
        "the subset is too small to show anything: {read}, {with_constants}"
    );
    // pgbench's statements are in the subset.
    let pgbench = "SELECT abalance FROM pgbench_accounts WHERE aid = 123456;";
    assert_eq!(plain_constants(pgbench), Some(vec![(50, 56, Token::Iconst as i32)]));
}
