//! [`Rows`]: a portable query result, and its mapping onto the caller's types.

use ncm_cache_core::{CacheError, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::de::RowDeserializer;
use crate::value::SqlValue;

/// The result of a query: column names and rows of [`SqlValue`]s.
///
/// This is what the cache stores (through its codec), so a hit returns exactly what the
/// database returned. [`Rows::deserialize`] maps each row onto a `T: Deserialize` — a struct
/// (fields by column name), a tuple (by position) or, for one-column results, a scalar.
///
/// ```
/// use ncm_cache_sql::{Rows, SqlValue};
///
/// #[derive(serde::Deserialize, Debug, PartialEq)]
/// struct User { id: i64, name: String, active: bool }
///
/// let rows = Rows::new(
///     vec!["id".into(), "name".into(), "active".into()],
///     vec![vec![SqlValue::Int(1), SqlValue::from("Ada"), SqlValue::Bool(true)]],
/// );
/// assert_eq!(rows.len(), 1);
/// assert_eq!(rows.get(0, "name"), Some(&SqlValue::from("Ada")));
/// let users: Vec<User> = rows.deserialize()?;
/// assert_eq!(users, vec![User { id: 1, name: "Ada".into(), active: true }]);
/// let pairs: Vec<(i64, String)> = rows.deserialize()?;
/// assert_eq!(pairs, vec![(1, "Ada".to_string())]);
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Rows {
    /// Column names, in result order.
    pub columns: Vec<String>,
    /// One entry per row, each with one value per column.
    pub rows: Vec<Vec<SqlValue>>,
}

impl Rows {
    /// A result from column names and rows.
    pub fn new(columns: Vec<String>, rows: Vec<Vec<SqlValue>>) -> Self {
        Self { columns, rows }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// `true` when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The index of a column by name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// The value in `row` under column `name`.
    pub fn get(&self, row: usize, name: &str) -> Option<&SqlValue> {
        let col = self.column_index(name)?;
        self.rows.get(row)?.get(col)
    }

    /// Iterates over the rows.
    pub fn iter(&self) -> impl Iterator<Item = &[SqlValue]> {
        self.rows.iter().map(Vec::as_slice)
    }

    /// Maps every row onto `T`: structs and maps by column name, tuples and sequences by
    /// position, scalars from a one-column result. Conversions are lenient where the
    /// databases differ: an integer 0/1 reads as a `bool`, numeric text as a number, a
    /// timestamp as RFC 3339 text (what `chrono` deserializes).
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        self.rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                T::deserialize(RowDeserializer::new(&self.columns, row)).map_err(|e| {
                    CacheError::InvalidArgument(format!(
                        "row {i} does not fit the target type: {e}"
                    ))
                })
            })
            .collect()
    }
}

impl<'a> IntoIterator for &'a Rows {
    type Item = &'a Vec<SqlValue>;
    type IntoIter = std::slice::Iter<'a, Vec<SqlValue>>;

    fn into_iter(self) -> Self::IntoIter {
        self.rows.iter()
    }
}
