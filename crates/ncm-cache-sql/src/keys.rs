//! Statement analysis (placeholders, canonical text, tables) and the cache keys built from it.
//!
//! An entry's key is `{namespace}:{db identity}:|{table}|{table}|:{hash}`:
//!
//! - the namespace (default `sql`) and the executor's identity keep databases apart;
//! - the tables the statement reads, bare and lowercased (`public.users` → `users`), sorted,
//!   with `%`, `|` and `:` percent-encoded — `|%|` marks a statement whose tables are unknown;
//! - a 128-bit xxh3 hash of the canonical statement (sqlparser's rendering: whitespace and
//!   keyword case do not matter, literals do) and of the parameter values.
//!
//! The tables are in the key for `invalidate_pattern` (`*users*`); invalidation itself does
//! not look at keys: every table has a generation key (`{namespace}:{db identity}#gen:{table}`,
//! plus `#gen*` for the whole database) holding a random token, an entry records the tokens
//! it was read under, and a lookup reads the entry and the current tokens in one batch. An
//! invalidation replaces the tokens: O(1) per table, whatever the size of the keyspace.

use std::ops::ControlFlow;

use ncm_cache_core::escape_glob;
use sqlparser::ast::{Ident, Statement, VisitMut, VisitorMut};
use sqlparser::tokenizer::{Token, Tokenizer};
use xxhash_rust::xxh3::Xxh3;

use crate::executor::SqlDialect;
use crate::params::{Template, translate};
use crate::rules::{self, Policy, Uncacheable};
use crate::tables::{self, TableName, footprint};
use crate::value::SqlValue;

/// The longest tables segment we put in a key; statements naming more are not cached.
const MAX_TAGS_LEN: usize = 1024;

/// Everything derived from a statement's text (memoized per SQL string).
#[derive(Debug)]
pub(crate) struct Analysis {
    /// The SQL rewritten for the driver.
    pub(crate) template: Template,
    /// Canonical text: hashed into keys, shown in logs and the slow-query list.
    pub(crate) normalized: String,
    /// `false` when sqlparser could not parse the statement.
    #[cfg_attr(not(test), allow(dead_code, reason = "read by tests and Debug"))]
    pub(crate) parsed: bool,
    /// Bare table names read or written, sorted; `None` when unknown.
    pub(crate) tags: Option<Vec<String>>,
    /// Tables written (empty: none); `unknown_writes` when they cannot be named.
    pub(crate) writes: Vec<TableName>,
    pub(crate) unknown_writes: bool,
    /// Why the result may not be cached (`None`: it may).
    pub(crate) uncacheable: Option<Uncacheable>,
    /// The statement may change the schema (DDL, or unparseable and possibly a write): the
    /// dependency map is reloaded before the next invalidation.
    pub(crate) ddl: bool,
}

impl Analysis {
    pub(crate) fn new(
        sql: &str,
        dialect: SqlDialect,
        names: Option<&[&str]>,
        policy: &Policy,
    ) -> Self {
        let template = translate(sql, dialect, names);
        match tables::parse(&template.sql, dialect) {
            Ok(mut statements) if !statements.is_empty() => {
                if dialect == SqlDialect::Postgres {
                    // PostgreSQL folds unquoted names to lowercase (result column names too),
                    // so `SELECT ID FROM Users` is `select id from users`.
                    let _ = statements.visit(&mut FoldUnquoted);
                }
                // MariaDB's executable comments are parsed as their text (for the tables they
                // name), but only MariaDB runs them: on MySQL `a /*M! JOIN b ... */` reads `a`
                // alone, so its key is the statement exactly as written (comments included:
                // collapsing whitespace drops comments, and `a /*M! LIMIT 1 */` shared the key of
                // `a` — review, helper-73), never that of a real JOIN. An AST's text never holds
                // a comment, so no other statement's key can equal it.
                let normalized = if template.sql.contains("/*M!") {
                    template.sql.clone()
                } else {
                    statements
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                let fp = footprint(&statements);
                let mut tags: Vec<String> = fp
                    .reads
                    .iter()
                    .chain(fp.writes.iter())
                    .map(|t| t.bare().to_owned())
                    .collect();
                tags.sort();
                tags.dedup();
                let writes = fp.unknown_writes || !fp.writes.is_empty();
                // Statements that change the schema (the dependency catalog is reloaded).
                let ddl = statements.iter().any(|s| {
                    !matches!(
                        s,
                        Statement::Query(_)
                            | Statement::Insert(_)
                            | Statement::Update(_)
                            | Statement::Delete(_)
                            | Statement::Merge(_)
                    ) && {
                        let text = s.to_string();
                        let first = text.split_whitespace().next().unwrap_or("");
                        [
                            "CREATE", "ALTER", "DROP", "TRUNCATE", "RENAME", "ATTACH", "DETACH",
                        ]
                        .iter()
                        .any(|k| first.eq_ignore_ascii_case(k))
                    }
                });
                let uncacheable = if writes {
                    Some(Uncacheable::Writes)
                } else if let Some(t) = rules::system_catalog(&fp.reads) {
                    Some(Uncacheable::SystemCatalog(t))
                } else {
                    rules::check(&statements, !fp.reads.is_empty(), policy).err()
                };
                Self {
                    template,
                    normalized,
                    parsed: true,
                    tags: Some(tags),
                    writes: fp.writes.into_iter().collect(),
                    unknown_writes: fp.unknown_writes,
                    uncacheable,
                    ddl,
                }
            }
            _ => {
                let may_write = rules::unparsed_may_write(&template.sql, dialect);
                Self {
                    normalized: collapse_whitespace(&template.sql, dialect),
                    unknown_writes: may_write,
                    ddl: may_write,
                    template,
                    parsed: false,
                    tags: None,
                    writes: Vec::new(),
                    uncacheable: Some(Uncacheable::Unparsed),
                }
            }
        }
    }

    /// `true` when the statement changes data (or might): such results are never cached and
    /// running them invalidates what they write (everything, when that is unknown).
    pub(crate) fn is_write(&self) -> bool {
        self.unknown_writes || !self.writes.is_empty()
    }
}

/// Lowercases unquoted identifiers.
struct FoldUnquoted;

impl VisitorMut for FoldUnquoted {
    type Break = ();

    fn pre_visit_ident(&mut self, ident: &mut Ident) -> ControlFlow<()> {
        if ident.quote_style.is_none() {
            // As PostgreSQL does in a UTF8 database: ASCII letters only (`Ärger` is not
            // `ärger`).
            ident.value.make_ascii_lowercase();
        }
        ControlFlow::Continue(())
    }
}

/// Token-wise whitespace collapse for statements sqlparser cannot parse: literals and quoted
/// names keep their exact text.
fn collapse_whitespace(sql: &str, dialect: SqlDialect) -> String {
    let Ok(tokens) = Tokenizer::new(dialect.parser_dialect(), sql)
        .with_unescape(false)
        .tokenize()
    else {
        return sql.to_owned();
    };
    let mut out = String::with_capacity(sql.len());
    let mut pending_space = false;
    for token in tokens {
        if let Token::Whitespace(_) = token {
            pending_space = true;
            continue;
        }
        if pending_space && !out.is_empty() {
            out.push(' ');
        }
        pending_space = false;
        out.push_str(&token.to_string());
    }
    out
}

/// How long a generation key lives after it was last written (created or invalidated): a
/// table that is no longer queried does not leave a key behind for good. Its expiry is an
/// invalidation (the next reader writes a new token), so it is always safe; a result cached
/// for longer than this misses once.
pub(crate) const GENERATION_TTL: std::time::Duration =
    std::time::Duration::from_secs(7 * 24 * 3600);

/// Builds keys and patterns for one database.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// `{namespace}:{identity}:`
    prefix: String,
    escaped_prefix: String,
    /// `{namespace}:{database identity}`: where the generation keys live.
    generations: String,
}

impl Keys {
    pub(crate) fn new(namespace: &str, identity: &str, database_identity: &str) -> Self {
        let prefix = format!("{namespace}:{identity}:");
        Self {
            escaped_prefix: escape_glob(&prefix).into_owned(),
            prefix,
            generations: format!("{namespace}:{database_identity}"),
        }
    }

    /// The entry key, or `None` when the statement names too many tables to fit.
    pub(crate) fn entry(&self, analysis: &Analysis, values: &[SqlValue]) -> Option<String> {
        let tags = match &analysis.tags {
            Some(tags) => {
                let mut s = String::from("|");
                for t in tags {
                    s.push_str(&encode_tag(t));
                    s.push('|');
                }
                s
            }
            None => "|%|".to_owned(),
        };
        if tags.len() > MAX_TAGS_LEN {
            return None;
        }
        Some(format!(
            "{}{tags}:{:032x}",
            self.prefix,
            hash(&analysis.normalized, values)
        ))
    }

    /// The generation key of `table` (a bare, lowercased name): a random token replaced by
    /// every invalidation of the table. Entries record the tokens they were read under.
    ///
    /// Generation keys are per database identity (every role and search_path of one database
    /// shares them), beside the entries and not under `{namespace}:{identity}:`, so user
    /// patterns (`invalidate_pattern`) never match them.
    pub(crate) fn generation(&self, table: &str) -> String {
        format!("{}#gen:{}", self.generations, encode_tag(table))
    }

    /// The shared catalog token of the database: replaced after a schema change through any
    /// instance, so every instance reloads its dependency catalog (`deps.rs`).
    pub(crate) fn catalog(&self) -> String {
        format!("{}#catalog", self.generations)
    }

    /// The generation key of the whole database (`invalidate_all`, writes to unknown tables).
    pub(crate) fn generation_all(&self) -> String {
        format!("{}#gen*", self.generations)
    }

    /// A user glob over the part of the key after the database (`|tables|:hash`).
    pub(crate) fn user_pattern(&self, glob: &str) -> String {
        format!("{}{glob}", self.escaped_prefix)
    }
}

fn encode_tag(tag: &str) -> String {
    let mut out = String::with_capacity(tag.len());
    for c in tag.chars() {
        match c {
            '%' => out.push_str("%25"),
            '|' => out.push_str("%7C"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
    out
}

/// xxh3-128 of the canonical statement and the values' stable encoding.
fn hash(normalized: &str, values: &[SqlValue]) -> u128 {
    let mut h = Xxh3::new();
    h.update(&(normalized.len() as u64).to_le_bytes());
    h.update(normalized.as_bytes());
    let mut buf = Vec::with_capacity(64);
    for v in values {
        buf.clear();
        v.stable_bytes(&mut buf);
        h.update(&buf);
    }
    h.digest128()
}

#[cfg(test)]
mod tests {
    use ncm_cache_core::GlobPattern;

    use super::*;

    fn key(sql: &str, values: &[SqlValue]) -> String {
        let keys = Keys::new("sql", "postgres://h:5432/db", "postgres://h:5432/db");
        keys.entry(
            &Analysis::new(sql, SqlDialect::Postgres, None, &Policy::default()),
            values,
        )
        .unwrap()
    }

    #[test]
    fn whitespace_and_keyword_case_do_not_matter_literals_do() {
        let a = key("SELECT * FROM users WHERE id = %s", &[SqlValue::Int(1)]);
        let b = key(
            "select *\n  from   USERS where ID=%s  ",
            &[SqlValue::Int(1)],
        );
        // PostgreSQL folds unquoted names; quoted ones are case-sensitive.
        assert_eq!(a, b);
        assert_ne!(
            a,
            key("SELECT * FROM \"USERS\" WHERE id = %s", &[SqlValue::Int(1)])
        );
        // SQLite and MySQL report result column names as written: case is kept.
        let keys = Keys::new("sql", "sqlite", "sqlite");
        let lite = |sql: &str| {
            keys.entry(
                &Analysis::new(sql, SqlDialect::Sqlite, None, &Policy::default()),
                &[],
            )
        };
        assert_eq!(lite("select ID from t"), lite("SELECT   ID FROM t"));
        assert_ne!(lite("SELECT id FROM t"), lite("SELECT ID FROM t"));
        assert_ne!(
            a,
            key("SELECT * FROM users WHERE id = %s", &[SqlValue::Int(2)])
        );
        assert_ne!(
            a,
            key(
                "SELECT * FROM users WHERE id = %s",
                &[SqlValue::Text("1".into())]
            )
        );
        assert_ne!(
            key("SELECT * FROM t WHERE n = 'a  b'", &[]),
            key("SELECT * FROM t WHERE n = 'a b'", &[])
        );
        assert_ne!(key("SELECT 1.0", &[]), key("SELECT 1.00", &[]));
        // PostgreSQL (UTF8) folds only ASCII letters: `Ärger` and `ärger` are two tables, and
        // `AS Ü` / `AS ü` two column names (review, helper-70: one key for both before).
        assert_eq!(
            key("SELECT * FROM ÄrGER", &[]),
            key("SELECT * FROM Ärger", &[])
        );
        assert_ne!(
            key("SELECT * FROM Ärger", &[]),
            key("SELECT * FROM ärger", &[])
        );
        assert_ne!(key("SELECT 1 AS Ü", &[]), key("SELECT 1 AS ü", &[]));
        // A MariaDB executable comment is not the statement it holds: MySQL ignores it.
        let keys = Keys::new("sql", "mysql", "mysql");
        let my = |sql: &str| {
            keys.entry(
                &Analysis::new(sql, SqlDialect::MySql, None, &Policy::default()),
                &[],
            )
            .unwrap()
        };
        assert_ne!(
            my("SELECT * FROM a /*M! JOIN b USING (id) */"),
            my("SELECT * FROM a JOIN b USING (id)")
        );
        assert!(my("SELECT * FROM a /*M! JOIN b USING (id) */").contains("|a|b|"));
        assert_ne!(my("SELECT * FROM a /*M! LIMIT 1 */"), my("SELECT * FROM a"));
        assert_ne!(
            my("SELECT * FROM a /*M! LIMIT 1 */"),
            my("SELECT * FROM a /*M! LIMIT 2 */")
        );
    }

    #[test]
    fn keys_carry_the_tables() {
        let k = key(
            "SELECT * FROM public.users u JOIN orders o ON o.uid = u.id",
            &[],
        );
        assert!(
            k.starts_with("sql:postgres://h:5432/db:|orders|users|:"),
            "{k}"
        );
        let keys = Keys::new("sql", "postgres://h:5432/db", "postgres://h:5432/db");
        // `invalidate_pattern("*users*")` (the original's example) matches by table name.
        let users = GlobPattern::new(&keys.user_pattern("*|users|*")).unwrap();
        let user = GlobPattern::new(&keys.user_pattern("*|user|*")).unwrap();
        assert!(users.matches(&k));
        assert!(!user.matches(&k));
        // Generation keys never look like entries of a table.
        assert!(!users.matches(&keys.generation("users")));
        assert_ne!(keys.generation("users"), keys.generation("user"));
        assert_ne!(keys.generation_all(), keys.generation("*"));
    }

    #[test]
    fn odd_table_names_are_encoded_and_escaped() {
        let keys = Keys::new("sql", "db[1]*", "db[1]*");
        let a = Analysis::new(
            r#"SELECT * FROM "a|b:c%" JOIN "x*""#,
            SqlDialect::Postgres,
            None,
            &Policy::default(),
        );
        let k = keys.entry(&a, &[]).unwrap();
        assert!(k.contains("|a%7Cb%3Ac%25|x*|"), "{k}");
        let g = GlobPattern::new(&keys.user_pattern("*")).unwrap();
        assert!(g.matches(&k));
        let other = Keys::new("sql", "db[1]x", "db[1]x");
        assert!(!g.matches(&other.entry(&a, &[]).unwrap()));
        assert_eq!(keys.generation("a|b"), "sql:db[1]*#gen:a%7Cb");
        assert!(
            !g.matches(&keys.generation("a|b")),
            "user patterns never match generations"
        );
    }

    #[test]
    fn collapse_keeps_literals() {
        assert_eq!(
            collapse_whitespace("SELEKT  'a   b' ,\n\t\"C  d\"", SqlDialect::Postgres),
            "SELEKT 'a   b' , \"C  d\""
        );
    }

    #[test]
    fn writes_are_detected() {
        let p = Policy::default();
        let a = Analysis::new(
            "INSERT INTO t (a) VALUES (%s)",
            SqlDialect::Postgres,
            None,
            &p,
        );
        assert!(a.is_write());
        assert_eq!(a.uncacheable, Some(Uncacheable::Writes));
        assert_eq!(a.writes, vec![TableName(vec!["t".into()])]);
        let one = Analysis::new("SELECT 1", SqlDialect::Postgres, None, &p);
        assert!(!one.is_write());
        assert_eq!(one.uncacheable, Some(Uncacheable::Tableless));
        // Unparseable: never cached; a possible write only when a write keyword appears.
        let bad = Analysis::new(
            "SELECT a FROM t WHERE ??? ))",
            SqlDialect::Postgres,
            None,
            &p,
        );
        assert!(!bad.parsed && !bad.is_write());
        // An unknown leading word: possibly a write (invalidates everything, conservatively).
        let unknown = Analysis::new("NOT SQL AT ALL", SqlDialect::Postgres, None, &p);
        assert!(!unknown.parsed && unknown.is_write());
        assert_eq!(bad.uncacheable, Some(Uncacheable::Unparsed));
        for system in [
            "SELECT * FROM pg_stat_activity",
            "SELECT column_name FROM information_schema.columns WHERE table_name = 't'",
            "SELECT name FROM sqlite_master",
        ] {
            let a = Analysis::new(system, SqlDialect::Postgres, None, &p);
            assert!(
                matches!(a.uncacheable, Some(Uncacheable::SystemCatalog(_))),
                "{system}: {:?}",
                a.uncacheable
            );
        }
        let bad_write = Analysis::new("UPDATE t SET ??? x", SqlDialect::Postgres, None, &p);
        assert!(!bad_write.parsed && bad_write.is_write());
    }
}
