//! Query parameters ([`SqlParams`], [`params!`](crate::params!)) and placeholder translation.
//!
//! The original passes `params={"id": 123}` with `%s` placeholders (Python DB-API "format"
//! style). Here a statement may use:
//!
//! - `%s` — the next parameter, in order (positional params, or named ones in insertion order);
//! - `%(name)s` — a named parameter (psycopg's "pyformat" style);
//! - `:name` — a named parameter, when `name` is one of the named params given;
//! - the driver's own placeholders (`$1` on PostgreSQL, `?` on MySQL and SQLite), passed through.
//!
//! Translation uses sqlparser's tokenizer, so text inside string literals, quoted identifiers,
//! dollar-quoted bodies and comments is never touched. When `%s`-style placeholders are used,
//! `%%` stands for a literal `%` operator (as in psycopg).

use std::collections::HashMap;

use ncm_cache_core::{CacheError, Result};
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use crate::executor::SqlDialect;
use crate::value::SqlValue;

/// The parameters of one statement: positional or named.
///
/// Build them with [`params!`](crate::params!), the constructors, or `From`:
///
/// ```
/// use ncm_cache_sql::{params, SqlParams, SqlValue};
///
/// let by_position = params![123, "electronics", None::<i64>];
/// assert_eq!(by_position, SqlParams::Positional(vec![
///     SqlValue::Int(123), SqlValue::from("electronics"), SqlValue::Null,
/// ]));
/// // The original's `params={"id": 123}`:
/// let by_name = params! { "id" => 123 };
/// assert_eq!(by_name, SqlParams::named([("id", 123)]));
/// assert_eq!(params![], SqlParams::none());
/// let built = SqlParams::none().bind(1).bind("x");
/// assert_eq!(built.len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum SqlParams {
    /// Values bound in order.
    Positional(Vec<SqlValue>),
    /// Values bound by name, in insertion order (which `%s` placeholders follow).
    Named(Vec<(String, SqlValue)>),
}

impl Default for SqlParams {
    fn default() -> Self {
        Self::none()
    }
}

impl SqlParams {
    /// No parameters.
    pub fn none() -> Self {
        Self::Positional(Vec::new())
    }

    /// Positional parameters.
    pub fn positional<I, V>(values: I) -> Self
    where
        I: IntoIterator<Item = V>,
        V: Into<SqlValue>,
    {
        Self::Positional(values.into_iter().map(Into::into).collect())
    }

    /// Named parameters, in the order given.
    pub fn named<I, K, V>(values: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<SqlValue>,
    {
        Self::Named(
            values
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// Appends a positional parameter (turns empty named params into positional ones).
    #[must_use]
    pub fn bind(mut self, value: impl Into<SqlValue>) -> Self {
        match &mut self {
            Self::Positional(v) => v.push(value.into()),
            Self::Named(n) if n.is_empty() => return Self::Positional(vec![value.into()]),
            Self::Named(n) => n.push((format!("_{}", n.len()), value.into())),
        }
        self
    }

    /// Appends a named parameter (turns empty positional params into named ones).
    #[must_use]
    pub fn bind_named(mut self, name: impl Into<String>, value: impl Into<SqlValue>) -> Self {
        match &mut self {
            Self::Named(n) => n.push((name.into(), value.into())),
            Self::Positional(v) if v.is_empty() => {
                return Self::Named(vec![(name.into(), value.into())]);
            }
            Self::Positional(v) => {
                let mut named: Vec<(String, SqlValue)> = v
                    .drain(..)
                    .enumerate()
                    .map(|(i, v)| (format!("_{i}"), v))
                    .collect();
                named.push((name.into(), value.into()));
                return Self::Named(named);
            }
        }
        self
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::Positional(v) => v.len(),
            Self::Named(n) => n.len(),
        }
    }

    /// `true` when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names, when named.
    pub(crate) fn names(&self) -> Option<Vec<&str>> {
        match self {
            Self::Positional(_) => None,
            Self::Named(n) => Some(n.iter().map(|(k, _)| k.as_str()).collect()),
        }
    }

    fn nth(&self, i: usize) -> Option<&SqlValue> {
        match self {
            Self::Positional(v) => v.get(i),
            Self::Named(n) => n.get(i).map(|(_, v)| v),
        }
    }

    fn by_name(&self, name: &str) -> Option<&SqlValue> {
        match self {
            Self::Positional(_) => None,
            Self::Named(n) => n.iter().find(|(k, _)| k == name).map(|(_, v)| v),
        }
    }
}

impl From<()> for SqlParams {
    fn from((): ()) -> Self {
        Self::none()
    }
}

impl From<Vec<SqlValue>> for SqlParams {
    fn from(v: Vec<SqlValue>) -> Self {
        Self::Positional(v)
    }
}

impl From<Vec<(String, SqlValue)>> for SqlParams {
    fn from(v: Vec<(String, SqlValue)>) -> Self {
        Self::Named(v)
    }
}

impl From<HashMap<String, SqlValue>> for SqlParams {
    /// A map's order is not defined, so sort by name (only `%(name)s` / `:name` placeholders
    /// make sense with it).
    fn from(map: HashMap<String, SqlValue>) -> Self {
        let mut v: Vec<_> = map.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Self::Named(v)
    }
}

/// Builds [`SqlParams`]: `params![a, b]` (positional) or `params! { "name" => value }` (named).
///
/// Every value goes through `Into<SqlValue>`.
///
/// ```
/// use ncm_cache_sql::{params, SqlValue};
/// let p = params! { "id" => 123, "active" => true };
/// assert_eq!(p.len(), 2);
/// let q = params![1.5, vec![0u8, 1], serde_json::json!({"a": 1})];
/// assert_eq!(q.len(), 3);
/// ```
#[macro_export]
macro_rules! params {
    () => {
        $crate::SqlParams::none()
    };
    ($($name:literal => $value:expr),+ $(,)?) => {
        $crate::SqlParams::Named(::std::vec![
            $((::std::string::String::from($name), $crate::SqlValue::from($value))),+
        ])
    };
    ($($value:expr),+ $(,)?) => {
        $crate::SqlParams::Positional(::std::vec![$($crate::SqlValue::from($value)),+])
    };
}

/// Where one driver placeholder takes its value from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The n-th parameter (positional, or named in insertion order).
    Nth(usize),
    /// A named parameter.
    Name(String),
}

/// A statement rewritten for the driver, and where each placeholder's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    /// The SQL with the driver's placeholders.
    pub(crate) sql: String,
    /// `None`: no placeholder was translated; the params are passed through in order.
    pub(crate) slots: Option<Vec<Slot>>,
}

impl Template {
    /// The values to bind, in driver order.
    pub(crate) fn values(&self, params: &SqlParams) -> Result<Vec<SqlValue>> {
        let Some(slots) = &self.slots else {
            return Ok(match params {
                SqlParams::Positional(v) => v.clone(),
                SqlParams::Named(n) => n.iter().map(|(_, v)| v.clone()).collect(),
            });
        };
        let nth_count = slots.iter().filter(|s| matches!(s, Slot::Nth(_))).count();
        if nth_count > 0 && nth_count != params.len() {
            return Err(CacheError::InvalidArgument(format!(
                "the statement has {nth_count} %s placeholder(s) but {} parameter(s) were given",
                params.len()
            )));
        }
        slots
            .iter()
            .map(|slot| match slot {
                Slot::Nth(i) => params.nth(*i).cloned().ok_or_else(|| {
                    CacheError::InvalidArgument(format!("no parameter for placeholder #{}", i + 1))
                }),
                Slot::Name(name) => params.by_name(name).cloned().ok_or_else(|| {
                    CacheError::InvalidArgument(format!("no parameter named {name:?}"))
                }),
            })
            .collect()
    }
}

/// Rewrites `%s`, `%(name)s` and `:name` (for `name` in `names`) into the dialect's
/// placeholders. SQL that does not tokenize is passed through unchanged (the database reports
/// the error).
pub(crate) fn translate(sql: &str, dialect: SqlDialect, names: Option<&[&str]>) -> Template {
    let passthrough = || Template {
        sql: sql.to_owned(),
        slots: None,
    };
    let Ok(tokens) = Tokenizer::new(dialect.parser_dialect(), sql).tokenize_with_location() else {
        return passthrough();
    };
    let offsets = LineOffsets::new(sql);
    let mut edits: Vec<(usize, usize, Edit)> = Vec::new();
    let mut i = 0;
    let word = |t: Option<&TokenWithSpan>| match t.map(|t| &t.token) {
        Some(Token::Word(w)) if w.quote_style.is_none() => Some(w.value.clone()),
        _ => None,
    };
    let is = |at: usize, want: &Token| tokens.get(at).is_some_and(|t| t.token == *want);
    let mut percent_style = false;
    while let Some(tok) = tokens.get(i) {
        let found: Option<(usize, Edit)> = match &tok.token {
            Token::Mod if word(tokens.get(i + 1)).as_deref() == Some("s") => Some((2, Edit::Next)),
            Token::Mod
                if is(i + 1, &Token::LParen)
                    && is(i + 3, &Token::RParen)
                    && word(tokens.get(i + 4)).as_deref() == Some("s") =>
            {
                word(tokens.get(i + 2)).map(|name| (5, Edit::Named(name)))
            }
            Token::Mod if is(i + 1, &Token::Mod) => Some((2, Edit::Percent)),
            // PostgreSQL tokenizes `%%` as one custom operator.
            Token::CustomBinaryOperator(op) if op == "%%" => Some((1, Edit::Percent)),
            Token::Colon => word(tokens.get(i + 1))
                .filter(|name| names.is_some_and(|n| n.contains(&name.as_str())))
                .map(|name| (2, Edit::Named(name))),
            _ => None,
        };
        let span = |n: usize| -> Option<(usize, usize)> {
            let start = offsets.byte(tokens.get(i)?.span.start)?;
            let end = offsets.byte(tokens.get(i + n - 1)?.span.end)?;
            Some((start, end))
        };
        match found.and_then(|(n, edit)| Some((n, edit, span(n)?))) {
            Some((n, edit, (start, end))) => {
                if matches!(tok.token, Token::Mod) && !matches!(edit, Edit::Percent) {
                    percent_style = true;
                }
                edits.push((start, end, edit));
                i += n;
            }
            None => i += 1,
        }
    }
    if !edits.iter().any(|(_, _, e)| !matches!(e, Edit::Percent)) {
        return passthrough();
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut slots: Vec<Slot> = Vec::new();
    let mut next = 0;
    let mut last = 0;
    for (start, end, edit) in edits {
        let Some(before) = sql.get(last..start) else {
            return passthrough();
        };
        out.push_str(before);
        last = end;
        let slot = match edit {
            Edit::Percent => {
                out.push_str(if percent_style { "%" } else { "%%" });
                continue;
            }
            Edit::Next => {
                next += 1;
                Slot::Nth(next - 1)
            }
            Edit::Named(name) => Slot::Name(name),
        };
        match dialect {
            SqlDialect::Postgres => {
                // Repeated names reuse their number.
                let n = match slots.iter().position(|s| *s == slot) {
                    Some(p) if matches!(slot, Slot::Name(_)) => p + 1,
                    _ => {
                        slots.push(slot);
                        slots.len()
                    }
                };
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => {
                slots.push(slot);
                out.push('?');
            }
        }
    }
    let Some(rest) = sql.get(last..) else {
        return passthrough();
    };
    out.push_str(rest);
    Template {
        sql: out,
        slots: Some(slots),
    }
}

enum Edit {
    /// `%s`
    Next,
    /// `%(name)s` or `:name`
    Named(String),
    /// `%%`
    Percent,
}

/// Maps the tokenizer's (line, column) locations — columns count characters — to byte offsets.
pub(crate) struct LineOffsets<'a> {
    sql: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineOffsets<'a> {
    pub(crate) fn new(sql: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
        Self { sql, starts }
    }

    pub(crate) fn byte(&self, loc: sqlparser::tokenizer::Location) -> Option<usize> {
        let line = usize::try_from(loc.line).ok()?.checked_sub(1)?;
        let col = usize::try_from(loc.column).ok()?.checked_sub(1)?;
        let start = *self.starts.get(line)?;
        let text = self.sql.get(start..)?;
        match text.char_indices().nth(col) {
            Some((b, _)) => Some(start + b),
            None if text.chars().count() == col => Some(self.sql.len()),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(sql: &str, names: Option<&[&str]>) -> Template {
        translate(sql, SqlDialect::Postgres, names)
    }

    #[test]
    fn percent_s_becomes_numbered_or_question_marks() {
        let t = pg("SELECT * FROM users WHERE id = %s AND name = %s", None);
        assert_eq!(t.sql, "SELECT * FROM users WHERE id = $1 AND name = $2");
        assert_eq!(t.slots, Some(vec![Slot::Nth(0), Slot::Nth(1)]));
        let t = translate("SELECT %s, %s", SqlDialect::MySql, None);
        assert_eq!(t.sql, "SELECT ?, ?");
        let t = translate("SELECT %s", SqlDialect::Sqlite, None);
        assert_eq!(t.sql, "SELECT ?");
    }

    #[test]
    fn named_styles_and_reuse() {
        let names = ["id", "name"];
        let t = pg(
            "SELECT * FROM t WHERE id = %(id)s OR parent = %(id)s AND n = :name",
            Some(&names),
        );
        assert_eq!(
            t.sql,
            "SELECT * FROM t WHERE id = $1 OR parent = $1 AND n = $2"
        );
        let values = t
            .values(&SqlParams::named([("name", "x"), ("id", "7")]))
            .unwrap();
        assert_eq!(values, vec![SqlValue::from("7"), SqlValue::from("x")]);
        let t = translate("SELECT :id + :id", SqlDialect::Sqlite, Some(&names));
        assert_eq!(t.sql, "SELECT ? + ?");
        assert_eq!(t.slots.unwrap().len(), 2);
    }

    #[test]
    fn quoted_text_and_comments_are_untouched() {
        let sql =
            "SELECT '%s', \"%s\", $$ %s $$ -- %s\n, %s /* :id %s */ FROM t WHERE a::text = :id";
        let t = pg(sql, Some(&["id"]));
        assert_eq!(
            t.sql,
            "SELECT '%s', \"%s\", $$ %s $$ -- %s\n, $1 /* :id %s */ FROM t WHERE a::text = $2"
        );
        assert_eq!(t.slots, Some(vec![Slot::Nth(0), Slot::Name("id".into())]));
    }

    #[test]
    fn colon_words_that_are_not_params_stay() {
        // An array slice / a label: only declared names are placeholders.
        let t = pg("SELECT a[1:hi] FROM t WHERE x = :id", Some(&["id"]));
        assert_eq!(t.sql, "SELECT a[1:hi] FROM t WHERE x = $1");
        let t = pg("SELECT a[lo:hi] FROM t", None);
        assert_eq!(t.slots, None);
    }

    #[test]
    fn double_percent_and_native_placeholders() {
        let t = pg("SELECT 10 %% 3, %s", None);
        assert_eq!(t.sql, "SELECT 10 % 3, $1");
        // Without %s placeholders, %% stays as the user wrote it and nothing is translated.
        let t = pg("SELECT $1, 10 % 3", None);
        assert_eq!(
            t,
            Template {
                sql: "SELECT $1, 10 % 3".into(),
                slots: None
            }
        );
        let t = translate("SELECT ? FROM t", SqlDialect::MySql, None);
        assert_eq!(t.slots, None);
    }

    #[test]
    fn multibyte_text_before_placeholders() {
        let t = pg("SELECT 'żółw', \n'日本' , %s -- é\n, %s", None);
        assert_eq!(t.sql, "SELECT 'żółw', \n'日本' , $1 -- é\n, $2");
    }

    #[test]
    fn counts_are_checked() {
        let t = pg("SELECT %s, %s", None);
        assert!(t.values(&params![1]).unwrap_err().is_invalid_input());
        assert!(t.values(&params![1, 2, 3]).is_err());
        let t = pg("SELECT %(missing)s", None);
        assert!(t.values(&params! { "other" => 1 }).is_err());
        // The original's style: named params, %s placeholders, insertion order.
        let t = pg("SELECT * FROM users WHERE id = %s", None);
        assert_eq!(
            t.values(&params! { "id" => 123 }).unwrap(),
            vec![SqlValue::Int(123)]
        );
    }

    #[test]
    fn untokenizable_sql_passes_through() {
        let t = pg("SELECT 'unterminated %s", None);
        assert_eq!(t.slots, None);
        assert_eq!(t.sql, "SELECT 'unterminated %s");
    }

    #[test]
    fn builders() {
        let p = SqlParams::none().bind_named("a", 1).bind_named("b", 2);
        assert_eq!(p.names(), Some(vec!["a", "b"]));
        let p = SqlParams::none().bind(1).bind_named("b", 2);
        assert_eq!(p.names(), Some(vec!["_0", "b"]));
        let p: SqlParams = ().into();
        assert!(p.is_empty());
        let mut m = HashMap::new();
        m.insert("z".to_string(), SqlValue::Int(1));
        m.insert("a".to_string(), SqlValue::Int(2));
        assert_eq!(SqlParams::from(m).names(), Some(vec!["a", "z"]));
    }
}
