//! Which tables a statement reads and writes, from sqlparser's syntax tree.
//!
//! Reads are every relation the statement names — in joins, subqueries, CTE bodies, set
//! operations, `INSERT … SELECT` sources, `UPDATE … FROM` — except CTE names used inside their
//! scope and table-valued functions. Writes are the targets of `INSERT`, `UPDATE`, `DELETE`,
//! `MERGE`, `TRUNCATE`, `COPY … FROM`, `SELECT … INTO` and table DDL, including DML nested in
//! CTEs. Names are lowercased (case never prevents an invalidation; at worst two tables that
//! differ only in quoted case share one).

use std::collections::BTreeSet;

use ncm_cache_core::{CacheError, Result};
use sqlparser::ast::{ObjectName, ObjectNamePart, Statement, Visit};
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer, Whitespace};

use crate::executor::SqlDialect;

mod collector;

use collector::{Collector, root_is_opaque};

/// Maximum nesting sqlparser accepts before it reports an error (deeper input is rejected,
/// never overflows the stack).
const RECURSION_LIMIT: usize = 64;

/// A table name: its identifier parts, lowercased (`["public", "users"]`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct TableName(pub(crate) Vec<String>);

impl TableName {
    pub(crate) fn from_object_name(name: &ObjectName) -> Self {
        Self(
            name.0
                .iter()
                .map(|part| match part {
                    ObjectNamePart::Identifier(ident) => ident.value.to_lowercase(),
                    other => other.to_string().to_lowercase(),
                })
                .collect(),
        )
    }

    /// The table without schema or database (`users`): what cache entries are tagged with.
    pub(crate) fn bare(&self) -> &str {
        self.0.last().map_or("", String::as_str)
    }

    /// `schema.table` as written.
    pub(crate) fn qualified(&self) -> String {
        self.0.join(".")
    }
}

/// What a statement changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writes {
    /// Nothing: a query, or a statement that changes no table data (`SET`, `BEGIN`, `SHOW`…).
    None,
    /// These tables (qualified names as written, lowercased).
    Tables(Vec<String>),
    /// Something we cannot see (`CALL`, `DROP SCHEMA`, unparseable SQL): treat every table as
    /// changed.
    Unknown,
}

/// What one parsed statement (or script) touches.
#[derive(Debug, Clone, Default)]
pub(crate) struct Footprint {
    pub(crate) reads: BTreeSet<TableName>,
    pub(crate) writes: BTreeSet<TableName>,
    pub(crate) unknown_writes: bool,
}

/// Parses `sql` with the dialect (bounded recursion).
pub(crate) fn parse(sql: &str, dialect: SqlDialect) -> Result<Vec<Statement>> {
    let parser = Parser::new(dialect.parser_dialect()).with_recursion_limit(RECURSION_LIMIT);
    let parsed = if dialect == SqlDialect::MySql {
        Tokenizer::new(dialect.parser_dialect(), sql)
            .tokenize_with_location()
            .map_err(ParserError::from)
            .and_then(|tokens| {
                let tokens = with_mariadb_comments(tokens, dialect)?;
                parser
                    .with_tokens_with_locations(without_modifiers(tokens))
                    .parse_statements()
            })
    } else {
        parser
            .try_with_sql(sql)
            .and_then(|mut p| p.parse_statements())
    };
    parsed.map_err(|e| CacheError::InvalidArgument(format!("cannot parse SQL: {e}")))
}

/// MariaDB's executable comments (`/*M! ... */`, `/*M!100100 ... */`) run their text on
/// MariaDB, as `/*! ... */` (which sqlparser expands) does on MySQL: their tokens are spliced in.
/// Left as comments, `SELECT * FROM a /*M! JOIN b USING (id) */` was cached under `a` only and
/// `/*M! DELETE FROM t */` was no write at all (review, helper-70).
fn with_mariadb_comments(
    tokens: Vec<TokenWithSpan>,
    dialect: SqlDialect,
) -> std::result::Result<Vec<TokenWithSpan>, ParserError> {
    let mut out = Vec::with_capacity(tokens.len());
    for t in tokens {
        if let Token::Whitespace(Whitespace::MultiLineComment(comment)) = &t.token
            && let Some(body) = comment.strip_prefix("M!")
        {
            let body = body.trim_start_matches(|c: char| c.is_ascii_digit());
            let inner = Tokenizer::new(dialect.parser_dialect(), body).tokenize_with_location()?;
            out.extend(with_mariadb_comments(inner, dialect)?);
            continue;
        }
        out.push(t);
    }
    Ok(out)
}

/// MySQL's `UPDATE [LOW_PRIORITY] [IGNORE]` and `DELETE [LOW_PRIORITY] [QUICK] [IGNORE]`
/// modifiers, dropped before parsing: sqlparser reads `UPDATE IGNORE orders` as the table
/// `ignore` aliased `orders` (and `DELETE IGNORE FROM t` as a multi-table delete of `ignore`),
/// so the write would invalidate a table that does not exist and miss the one it changes. None
/// of them changes which tables are read or written. (`IGNORE` and `LOW_PRIORITY` are reserved
/// words in MySQL, never a name; `QUICK` is dropped only right after `DELETE`.)
fn without_modifiers(tokens: Vec<TokenWithSpan>) -> Vec<TokenWithSpan> {
    let mut out = Vec::with_capacity(tokens.len());
    // The statement keyword whose modifiers may follow, while only modifiers have.
    let mut after: Option<Keyword> = None;
    for t in tokens {
        match &t.token {
            Token::Whitespace(_) => {}
            Token::Word(w) if w.quote_style.is_none() => {
                let modifier = match after {
                    Some(Keyword::UPDATE) => {
                        matches!(w.keyword, Keyword::LOW_PRIORITY | Keyword::IGNORE)
                    }
                    Some(_) => {
                        matches!(w.keyword, Keyword::LOW_PRIORITY | Keyword::IGNORE)
                            || w.value.eq_ignore_ascii_case("QUICK")
                    }
                    None => false,
                };
                if modifier {
                    continue;
                }
                after = matches!(w.keyword, Keyword::UPDATE | Keyword::DELETE).then_some(w.keyword);
            }
            _ => after = None,
        }
        out.push(t);
    }
    out
}

/// The tables a statement reads or writes, as `schema.table` / `table` (lowercased, sorted,
/// without duplicates). CTE names and table functions are not tables.
///
/// ```
/// use ncm_cache_sql::{referenced_tables, SqlDialect};
/// let sql = "WITH recent AS (SELECT * FROM public.orders WHERE day > now() - interval '1 day')
///            SELECT u.name, r.total FROM Users u JOIN recent r ON r.user_id = u.id
///            WHERE u.id IN (SELECT user_id FROM \"Bans\")";
/// assert_eq!(
///     referenced_tables(sql, SqlDialect::Postgres).unwrap(),
///     vec!["bans", "public.orders", "users"],
/// );
/// ```
pub fn referenced_tables(sql: &str, dialect: SqlDialect) -> Result<Vec<String>> {
    let fp = footprint(&parse(sql, dialect)?);
    let all: BTreeSet<String> = fp
        .reads
        .iter()
        .chain(fp.writes.iter())
        .map(TableName::qualified)
        .collect();
    Ok(all.into_iter().collect())
}

/// The tables a statement changes.
///
/// ```
/// use ncm_cache_sql::{written_tables, SqlDialect, Writes};
/// let w = written_tables("UPDATE accounts a SET balance = b.total FROM balances b WHERE a.id = b.id",
///                        SqlDialect::Postgres).unwrap();
/// assert_eq!(w, Writes::Tables(vec!["accounts".into()]));
/// assert_eq!(written_tables("SELECT 1", SqlDialect::Postgres).unwrap(), Writes::None);
/// assert_eq!(written_tables("CALL refresh()", SqlDialect::Postgres).unwrap(), Writes::Unknown);
/// ```
pub fn written_tables(sql: &str, dialect: SqlDialect) -> Result<Writes> {
    Ok(footprint(&parse(sql, dialect)?).writes())
}

impl Footprint {
    pub(crate) fn writes(&self) -> Writes {
        if self.unknown_writes {
            Writes::Unknown
        } else if self.writes.is_empty() {
            Writes::None
        } else {
            Writes::Tables(self.writes.iter().map(TableName::qualified).collect())
        }
    }
}

/// Reads and writes of parsed statements.
pub(crate) fn footprint(statements: &[Statement]) -> Footprint {
    let mut c = Collector::default();
    for statement in statements {
        if root_is_opaque(statement) {
            c.fp.unknown_writes = true;
        }
        let _ = statement.visit(&mut c);
    }
    c.fp
}

/// Parses a table name given by a user or a notification (`users`, `public.users`,
/// `"My Table"`) into its lowercased parts.
/// A name that does not parse as one (`audit log`, `orders; x`) is taken whole, as a quoted
/// name would be: never its first word alone (`invalidate_table("audit log")` bumped `audit`).
pub(crate) fn parse_table_name(name: &str, dialect: SqlDialect) -> TableName {
    let parsed = Parser::new(dialect.parser_dialect())
        .try_with_sql(name)
        .and_then(|mut p| {
            let object = p.parse_object_name(false)?;
            Ok((object, p.peek_token().token == Token::EOF))
        });
    match parsed {
        Ok((object, true)) if !object.0.is_empty() => TableName::from_object_name(&object),
        // `public.audit log`: the schema, then the rest as one name.
        _ => TableName(match name.trim().rsplit_once('.') {
            Some((schema, table)) if !schema.trim().is_empty() && !table.trim().is_empty() => {
                vec![schema.trim().to_lowercase(), table.trim().to_lowercase()]
            }
            _ => vec![name.trim().to_lowercase()],
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_name_is_parsed_whole_or_taken_whole() {
        let name = |n: &str| parse_table_name(n, SqlDialect::Postgres).qualified();
        assert_eq!(name("users"), "users");
        assert_eq!(name(" Public.Users "), "public.users");
        assert_eq!(name("\"Audit Log\""), "audit log");
        // Extra words are not dropped: the name is the whole text (review, helper-70:
        // `audit log` named the table `audit`).
        assert_eq!(name("audit log"), "audit log");
        assert_eq!(name("order items"), "order items");
        assert_eq!(name("public.audit log"), "public.audit log");
        assert_eq!(
            parse_table_name("public.audit log", SqlDialect::Postgres).bare(),
            "audit log"
        );
        assert_eq!(
            parse_table_name("`shop`.`orders`", SqlDialect::MySql).qualified(),
            "shop.orders"
        );
    }
}
