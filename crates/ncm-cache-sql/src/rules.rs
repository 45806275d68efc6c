//! Which statements may be cached: the rules are listed in the crate README ("What is never
//! cached"); the unit tests below and `tests/postgres.rs` / `tests/sqlite.rs` check them.
//!
//! A result is cached only when the statement is one or more queries (`SELECT`, `WITH`,
//! `VALUES`, `TABLE`) that read at least one table, take no row locks and call only functions
//! known to be deterministic. Everything else runs uncached, with the reason counted in
//! [`SqlPerformanceStats::uncached_reasons`](crate::SqlPerformanceStats).

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, FunctionArguments, ObjectNamePart, Statement, TableFactor, Visit, Visitor,
};
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::executor::SqlDialect;

/// Why a statement's result is not cached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Uncacheable {
    /// sqlparser could not parse it (run as given, never cached).
    Unparsed,
    /// Not a query (`SHOW`, `EXPLAIN`, `SET`, `PRAGMA`, …).
    NotAQuery,
    /// It writes (`INSERT … RETURNING`, data-modifying CTEs, …).
    Writes,
    /// `FOR UPDATE` / `FOR SHARE` / `SKIP LOCKED`: a row lock is a side effect.
    Locks,
    /// Calls a volatile or side-effecting function (`nextval`, `random`, `now`, …).
    Volatile(String),
    /// Calls a function not known to be deterministic (opt in with
    /// `cache_unknown_functions` or `deterministic_functions`).
    UnknownFunction(String),
    /// Reads no table, so no write could ever invalidate it (opt in with `cache_tableless`).
    Tableless,
    /// Names more tables than fit in a key.
    TooManyTables,
    /// Reads a system catalog or statistics view (`pg_stat_activity`, `information_schema`,
    /// `sqlite_master`, …), which changes without any write through the cache.
    SystemCatalog(String),
}

impl Uncacheable {
    /// The stats label.
    pub(crate) fn label(&self) -> String {
        match self {
            Self::Unparsed => "unparsed".into(),
            Self::NotAQuery => "not a query".into(),
            Self::Writes => "writes".into(),
            Self::Locks => "row locks".into(),
            Self::Volatile(f) => format!("volatile function {f}()"),
            Self::UnknownFunction(f) => format!("unknown function {f}()"),
            Self::Tableless => "reads no table".into(),
            Self::TooManyTables => "too many tables".into(),
            Self::SystemCatalog(t) => format!("system catalog {t}"),
        }
    }
}

/// What the caller opted into.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    /// Cache statements calling functions outside the deterministic list.
    pub(crate) unknown_functions: bool,
    /// Extra functions (lowercased, bare names) declared deterministic.
    pub(crate) deterministic: HashSet<String>,
    /// Cache results that read no table.
    pub(crate) tableless: bool,
}

/// Functions whose result changes between calls or that change something: never cached, whatever
/// the opt-ins (PostgreSQL, MySQL/MariaDB and SQLite names).
const VOLATILE: &[&str] = &[
    // Sequences and generated ids.
    "nextval",
    "setval",
    "currval",
    "lastval",
    "last_insert_id",
    "last_insert_rowid",
    "changes",
    "total_changes",
    "row_count",
    "found_rows",
    "uuid",
    "uuid_short",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "newid",
    "sys_guid",
    // Randomness.
    "random",
    "rand",
    "randomblob",
    "random_bytes",
    "setseed",
    // The clock.
    "now",
    "current_timestamp",
    "current_time",
    "current_date",
    "localtime",
    "localtimestamp",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "sysdate",
    "utc_timestamp",
    "utc_date",
    "utc_time",
    "curdate",
    "curtime",
    "unix_timestamp",
    "unixepoch",
    // Sessions, transactions, locks, sleeping, side channels.
    "connection_id",
    "pg_backend_pid",
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "sleep",
    "benchmark",
    "get_lock",
    "release_lock",
    "release_all_locks",
    "is_free_lock",
    "is_used_lock",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "set_config",
    "current_setting",
    "pg_notify",
    "dblink",
    "dblink_exec",
    "lo_import",
    "lo_export",
    "lo_create",
    "lo_unlink",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_cancel_backend",
    "pg_terminate_backend",
    "pg_reload_conf",
    "pg_switch_wal",
    "pg_logical_emit_message",
    "load_file",
    "master_pos_wait",
    "source_pos_wait",
    "nextval_for",
    "lastval_for",
    "setval_for",
];

/// Functions known to be deterministic for equal arguments and data (aggregates, window
/// functions, arithmetic, text, JSON, arrays, date arithmetic on given values).
const DETERMINISTIC: &[&str] = &[
    // Aggregates and window functions.
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "bool_and",
    "bool_or",
    "every",
    "group_concat",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "bit_and",
    "bit_or",
    "bit_xor",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    "total",
    // Conditionals and comparison.
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "ifnull",
    "nvl",
    "if",
    "iif",
    "isnull",
    // Numbers.
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "truncate",
    "mod",
    "power",
    "pow",
    "sqrt",
    "cbrt",
    "exp",
    "ln",
    "log",
    "log10",
    "log2",
    "sign",
    "div",
    "pi",
    "degrees",
    "radians",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "atan2",
    "width_bucket",
    // Text.
    "lower",
    "upper",
    "lcase",
    "ucase",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "substr",
    "substring",
    "trim",
    "ltrim",
    "rtrim",
    "btrim",
    "replace",
    "concat",
    "concat_ws",
    "left",
    "right",
    "lpad",
    "rpad",
    "position",
    "strpos",
    "instr",
    "locate",
    "split_part",
    "reverse",
    "repeat",
    "format",
    "initcap",
    "translate",
    "ascii",
    "chr",
    "char",
    "md5",
    "sha1",
    "sha2",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "encode",
    "decode",
    "hex",
    "unhex",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "regexp_replace",
    "regexp_match",
    "regexp_matches",
    "regexp_substr",
    "regexp_like",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "starts_with",
    "to_hex",
    "printf",
    "string_to_array",
    "array_to_string",
    "field",
    "find_in_set",
    "elt",
    "space",
    "soundex",
    // Types and formatting (of given values).
    "cast",
    "convert",
    "to_char",
    "to_number",
    "to_date",
    "to_timestamp",
    "date_trunc",
    "date_part",
    "extract",
    "make_date",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "make_interval",
    "date_add",
    "date_sub",
    "datediff",
    "date_format",
    "str_to_date",
    "timestampdiff",
    "timestampadd",
    "year",
    "month",
    "day",
    "hour",
    "minute",
    "second",
    "dayofweek",
    "dayofmonth",
    "dayofyear",
    "week",
    "weekday",
    "quarter",
    "last_day",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "typeof",
    // JSON and arrays.
    "to_json",
    "to_jsonb",
    "row_to_json",
    "array_to_json",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "json_object",
    "json_array",
    "json_extract",
    "json_extract_path",
    "json_extract_path_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "json_array_length",
    "jsonb_array_length",
    "json_typeof",
    "jsonb_typeof",
    "jsonb_set",
    "jsonb_insert",
    "jsonb_strip_nulls",
    "json_strip_nulls",
    "jsonb_pretty",
    "json_each",
    "jsonb_each",
    "json_each_text",
    "jsonb_each_text",
    "json_array_elements",
    "jsonb_array_elements",
    "json_array_elements_text",
    "jsonb_array_elements_text",
    "jsonb_object_keys",
    "json_object_keys",
    "json_unquote",
    "json_value",
    "json_query",
    "json_contains",
    "json_keys",
    "json_length",
    "json_valid",
    "array_length",
    "array_upper",
    "array_lower",
    "array_position",
    "array_positions",
    "array_append",
    "array_prepend",
    "array_cat",
    "array_remove",
    "array_replace",
    "cardinality",
    "unnest",
    "generate_series",
    "generate_subscripts",
    "array",
    // Session facts that are part of the cache's database identity (user, database,
    // search_path) or fixed for a server.
    "current_user",
    "session_user",
    "user",
    "current_role",
    "current_schema",
    "current_database",
    "database",
    "schema",
    "version",
    // SQLite date functions (volatile only with 'now', checked separately).
    "date",
    "time",
    "datetime",
    "julianday",
    "strftime",
];

/// SQLite date functions: deterministic unless an argument is the literal `'now'`.
const NOW_SENSITIVE: &[&str] = &[
    "date",
    "time",
    "datetime",
    "julianday",
    "strftime",
    "unixepoch",
];

/// Checks the parsed statements; `Ok(())` when the result may be cached.
pub(crate) fn check(
    statements: &[Statement],
    reads_tables: bool,
    policy: &Policy,
) -> Result<(), Uncacheable> {
    for statement in statements {
        let Statement::Query(query) = statement else {
            return Err(Uncacheable::NotAQuery);
        };
        let mut walk = Walk {
            policy,
            verdict: None,
        };
        let _ = query.visit(&mut walk);
        if let Some(verdict) = walk.verdict {
            return Err(verdict);
        }
    }
    if !reads_tables && !policy.tableless {
        return Err(Uncacheable::Tableless);
    }
    Ok(())
}

struct Walk<'a> {
    policy: &'a Policy,
    verdict: Option<Uncacheable>,
}

impl Walk<'_> {
    /// Records the first reason found; stops the walk.
    fn refuse(&mut self, reason: Uncacheable) -> ControlFlow<()> {
        self.verdict = Some(reason);
        ControlFlow::Break(())
    }

    fn function(&mut self, name: &str, args: &FunctionArguments) -> ControlFlow<()> {
        // With an argument these read a given value, not the clock.
        let clock_with_args =
            matches!(name, "unix_timestamp" | "unixepoch") && has_args(args) && !mentions_now(args);
        if VOLATILE.contains(&name) && !clock_with_args {
            return self.refuse(Uncacheable::Volatile(name.to_owned()));
        }
        // SQLite date functions read the clock with 'now' or with no time value at all.
        if NOW_SENSITIVE.contains(&name) && (mentions_now(args) || !has_args(args)) {
            return self.refuse(Uncacheable::Volatile(format!("{name}('now')")));
        }
        if clock_with_args {
            return ControlFlow::Continue(());
        }
        if DETERMINISTIC.contains(&name)
            || self.policy.unknown_functions
            || self.policy.deterministic.contains(name)
        {
            return ControlFlow::Continue(());
        }
        self.refuse(Uncacheable::UnknownFunction(name.to_owned()))
    }
}

impl Visitor for Walk<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &sqlparser::ast::Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            return self.refuse(Uncacheable::Locks);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::Function(f) => self.function(&bare_name(&f.name.0), &f.args),
            // PostgreSQL's special date strings read the clock: `'now'::timestamptz`,
            // `TIMESTAMP 'today'`, `'tomorrow'::date`.
            Expr::Value(v) if is_clock_string(&v.to_string()) => {
                self.refuse(Uncacheable::Volatile("'now'".into()))
            }
            Expr::TypedString(t) if is_clock_string(&t.to_string()) => {
                self.refuse(Uncacheable::Volatile("'now'".into()))
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            // A random sample of a table.
            TableFactor::Table {
                sample: Some(_), ..
            } => self.refuse(Uncacheable::Volatile("TABLESAMPLE".into())),
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => self.function(&bare_name(&name.0), &FunctionArguments::None),
            TableFactor::Function { name, .. } => {
                self.function(&bare_name(&name.0), &FunctionArguments::None)
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

/// The last part of a (possibly qualified) function name, lowercased.
fn bare_name(parts: &[ObjectNamePart]) -> String {
    match parts.last() {
        Some(ObjectNamePart::Identifier(ident)) => ident.value.to_lowercase(),
        Some(other) => other.to_string().to_lowercase(),
        None => String::new(),
    }
}

/// `true` when a function is called with at least one argument.
fn has_args(args: &FunctionArguments) -> bool {
    match args {
        FunctionArguments::List(list) => !list.args.is_empty(),
        FunctionArguments::Subquery(_) => true,
        FunctionArguments::None => false,
    }
}

/// A string literal (possibly typed: `TIMESTAMP 'now'`) naming a moment relative to the clock.
fn is_clock_string(text: &str) -> bool {
    let lower = text.to_lowercase();
    ["'now'", "'today'", "'tomorrow'", "'yesterday'"]
        .iter()
        .any(|s| lower.contains(s))
}

/// `true` when an argument's text contains the string literal `'now'`.
fn mentions_now(args: &FunctionArguments) -> bool {
    args.to_string().to_lowercase().contains("'now'")
}

/// Schemas of system catalogs and statistics (PostgreSQL, MySQL/MariaDB).
const SYSTEM_SCHEMAS: &[&str] = &[
    "pg_catalog",
    "information_schema",
    "performance_schema",
    "sys",
    "mysql",
    "pg_toast",
];

/// The first table `reads` names that is a system catalog or statistics view, if any: a
/// `pg_*` or `sqlite_*` name, or a table of a system schema.
pub(crate) fn system_catalog<'a>(
    reads: impl IntoIterator<Item = &'a crate::tables::TableName>,
) -> Option<String> {
    reads.into_iter().find_map(|t| {
        let parts = &t.0;
        let bare = parts.last()?;
        let system = bare.starts_with("pg_")
            || bare.starts_with("sqlite_")
            || parts.len() > 1 && SYSTEM_SCHEMAS.contains(&parts[parts.len() - 2].as_str());
        system.then(|| t.qualified())
    })
}

/// Leading keywords of statements that only read (or change nothing but the session).
const READ_LEADERS: &[&str] = &[
    "select",
    "values",
    "table",
    "show",
    "explain",
    "describe",
    "desc",
    "pragma",
    "begin",
    "start",
    "commit",
    "rollback",
    "savepoint",
    "release",
    "set",
    "reset",
    "use",
    "help",
];

/// For a statement sqlparser could not parse: `true` when it may write. Each statement of a
/// script (split at `;`) is classified by its leading keyword: reads (`SELECT`, `SHOW`, `EXPLAIN`, …) do not, unless a `SELECT … INTO`
/// creates a table; `WITH` writes when its body has `INSERT`, `DELETE`, `MERGE` or an `UPDATE`
/// that is not a lock (`FOR [NO KEY] UPDATE`); every other statement may. Column names and
/// function calls (`replace(..)`, a column `comment`) do not count.
pub(crate) fn unparsed_may_write(sql: &str, dialect: SqlDialect) -> bool {
    let Ok(tokens) = Tokenizer::new(dialect.parser_dialect(), sql).tokenize() else {
        return true;
    };
    // A script: drivers run every statement, so each is judged by its own leading word.
    tokens
        .split(|t| matches!(t, Token::SemiColon))
        .any(statement_may_write)
}

/// [`unparsed_may_write`] for one statement's tokens.
fn statement_may_write(tokens: &[Token]) -> bool {
    let words: Vec<String> = tokens
        .iter()
        .filter_map(|t| match t {
            Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_lowercase()),
            _ => None,
        })
        .collect();
    let Some(first) = words.first() else {
        return false;
    };
    match first.as_str() {
        "with" => words.iter().enumerate().any(|(i, w)| match w.as_str() {
            "insert" | "delete" | "merge" => true,
            "update" => {
                let before = |k: usize| i.checked_sub(k).and_then(|j| words.get(j));
                !(before(1).is_some_and(|w| w == "for")
                    || (before(1).is_some_and(|w| w == "key")
                        && before(2).is_some_and(|w| w == "no")))
            }
            _ => false,
        }),
        "select" => words.iter().any(|w| w == "into"),
        leader => !READ_LEADERS.contains(&leader),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::parse;

    fn verdict(sql: &str, policy: &Policy) -> Result<(), Uncacheable> {
        let statements = parse(sql, SqlDialect::Postgres).unwrap();
        check(&statements, true, policy)
    }

    #[test]
    fn lists_are_disjoint_and_lowercase() {
        for f in VOLATILE {
            assert!(!DETERMINISTIC.contains(f), "{f} in both lists");
            assert_eq!(*f, f.to_lowercase());
        }
        for f in DETERMINISTIC {
            assert_eq!(*f, f.to_lowercase());
        }
    }

    #[test]
    fn rules() {
        let p = Policy::default();
        assert_eq!(verdict("SELECT count(*), max(id) FROM t", &p), Ok(()));
        assert_eq!(
            verdict("SELECT nextval('s') FROM t", &p),
            Err(Uncacheable::Volatile("nextval".into()))
        );
        assert_eq!(
            verdict("SELECT id FROM jobs FOR UPDATE SKIP LOCKED LIMIT 1", &p),
            Err(Uncacheable::Locks)
        );
        assert_eq!(
            verdict("SELECT * FROM t WHERE at > CURRENT_TIMESTAMP", &p),
            Err(Uncacheable::Volatile("current_timestamp".into()))
        );
        assert_eq!(
            verdict("SELECT my_score(id) FROM t", &p),
            Err(Uncacheable::UnknownFunction("my_score".into()))
        );
        assert_eq!(verdict("SHOW search_path", &p), Err(Uncacheable::NotAQuery));
        let opted = Policy {
            deterministic: ["my_score".to_owned()].into(),
            ..Policy::default()
        };
        assert_eq!(verdict("SELECT my_score(id) FROM t", &opted), Ok(()));
        // Volatile functions stay uncacheable even with every opt-in.
        let all = Policy {
            unknown_functions: true,
            tableless: true,
            ..Policy::default()
        };
        assert!(verdict("SELECT random() FROM t", &all).is_err());
        assert_eq!(verdict("SELECT other_fn(id) FROM t", &all), Ok(()));
        // SQLite date functions: volatile with 'now' or without a time value.
        assert!(verdict("SELECT datetime('now') FROM t", &p).is_err());
        assert!(verdict("SELECT date() FROM t", &p).is_err());
        assert_eq!(verdict("SELECT date('2024-01-01') FROM t", &p), Ok(()));
        // Clock strings, samples; clock functions given a value are deterministic.
        for sql in [
            "SELECT * FROM t WHERE at > 'now'::timestamptz",
            "SELECT * FROM t WHERE at > TIMESTAMP 'today'",
            "SELECT * FROM t TABLESAMPLE BERNOULLI (10)",
        ] {
            assert!(verdict(sql, &p).is_err(), "{sql}");
        }
        assert_eq!(verdict("SELECT unix_timestamp(at) FROM t", &p), Ok(()));
        assert!(verdict("SELECT unix_timestamp() FROM t", &p).is_err());
    }

    #[test]
    fn unparsed_statements_with_write_words_may_write() {
        let d = SqlDialect::Sqlite;
        assert!(unparsed_may_write(
            "DELETE FROM t INDEXED BY i RETURNING *",
            d
        ));
        assert!(!unparsed_may_write("SELECT weird syntax ~~~ FROM t", d));
        // Quoted identifiers do not count.
        assert!(!unparsed_may_write("SELECT \"update\" FROM t ???", d));
        // A script: each statement by its own leading word (drivers run every statement;
        // found by review: a script led by a read was taken for a read).
        assert!(unparsed_may_write(
            "SELECT 1 FROM t INDEXED BY i; DELETE FROM t WHERE id = 1",
            d
        ));
        assert!(!unparsed_may_write(
            "SELECT 1 FROM t INDEXED BY i; SELECT 2 FROM t ???;",
            d
        ));
        assert!(unparsed_may_write(
            "SELECT 1 FROM t ???; WITH x AS (SELECT 1) DELETE FROM t",
            d
        ));
    }
}
