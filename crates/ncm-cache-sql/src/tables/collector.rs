//! The syntax-tree walk behind [`footprint`](super::footprint): relations read (with CTE
//! scoping), write targets, and statements whose effects cannot be named.

use std::ops::ControlFlow;
use std::ptr;

use sqlparser::ast::{
    CopySource, Expr, FromTable, Ident, ObjectName, ObjectNamePart, ObjectType, Query, Select,
    SetExpr, Statement, TableFactor, TableObject, TableWithJoins, Visitor,
};

use super::{Footprint, TableName};

/// Statements that may change data we cannot name.
pub(super) fn root_is_opaque(statement: &Statement) -> bool {
    match statement {
        Statement::Drop { object_type, .. } => {
            matches!(object_type, ObjectType::Schema | ObjectType::Database)
        }
        Statement::Query(_)
        | Statement::Insert(_)
        | Statement::Update(_)
        | Statement::Delete(_)
        | Statement::Merge(_)
        | Statement::Truncate(_)
        | Statement::Copy { .. }
        | Statement::LoadData { .. }
        | Statement::CreateTable(_)
        | Statement::CreateView(_)
        | Statement::CreateVirtualTable { .. }
        | Statement::AlterTable(_)
        | Statement::AlterView { .. }
        | Statement::RenameTable(_)
        | Statement::CreateIndex(_)
        | Statement::AlterIndex { .. }
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateSequence { .. }
        | Statement::CreateFunction(_)
        | Statement::CreateProcedure { .. }
        | Statement::CreateTrigger(_)
        | Statement::DropTrigger(_)
        | Statement::DropFunction(_)
        | Statement::CreateExtension(_)
        | Statement::CreateRole(_)
        | Statement::CreateType { .. }
        | Statement::CreateDomain(_)
        | Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::Comment { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. }
        | Statement::Set(_)
        | Statement::Reset(_)
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowCollation { .. }
        | Statement::ShowViews { .. }
        | Statement::ShowObjects(_)
        | Statement::ShowCharset(_)
        | Statement::ShowProcessList { .. }
        | Statement::ExplainTable { .. }
        | Statement::Explain { .. }
        | Statement::Use(_)
        | Statement::Analyze(_)
        | Statement::Vacuum(_)
        | Statement::Pragma { .. }
        | Statement::LISTEN { .. }
        | Statement::UNLISTEN { .. }
        | Statement::NOTIFY { .. }
        | Statement::Lock(_)
        | Statement::LockTables { .. }
        | Statement::UnlockTables
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::Prepare { .. }
        | Statement::Deallocate { .. }
        | Statement::Discard { .. }
        | Statement::Kill { .. } => false,
        _ => true,
    }
}

#[derive(Default)]
struct Frame {
    /// CTE names defined by this query, lowercased.
    names: Vec<String>,
    /// The CTE bodies, to recognise them when the visitor enters them.
    bodies: Vec<*const Query>,
    recursive: bool,
    /// How many of `names` are in scope at the current point of the walk.
    active: usize,
}

#[derive(Default)]
pub(super) struct Collector {
    frames: Vec<Frame>,
    /// Names of table-valued function calls (`FROM generate_series(1, 3)`), and aliases
    /// named where a table may be (MySQL's `DELETE FROM a USING orders AS a`): not tables.
    functions: Vec<*const ObjectName>,
    pub(super) fp: Footprint,
}

/// The aliased tables of `t` (its relation and joins, inside parenthesized joins too).
fn aliases<'a>(t: &'a TableWithJoins, out: &mut Vec<(&'a Ident, &'a ObjectName)>) {
    for factor in std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)) {
        match factor {
            TableFactor::Table {
                name,
                alias: Some(alias),
                ..
            } => out.push((&alias.name, name)),
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => aliases(table_with_joins, out),
            _ => {}
        }
    }
}

impl Collector {
    fn is_cte(&self, name: &ObjectName) -> bool {
        let [ObjectNamePart::Identifier(ident)] = name.0.as_slice() else {
            return false;
        };
        let wanted = ident.value.to_lowercase();
        self.frames
            .iter()
            .any(|f| f.names.iter().take(f.active).any(|n| *n == wanted))
    }

    fn write(&mut self, name: &ObjectName) {
        self.fp.writes.insert(TableName::from_object_name(name));
    }

    /// `factor` is written. The target of an `UPDATE`, `DELETE` or `MERGE` (`target`) is
    /// always a table, also where a CTE has its name (PostgreSQL never resolves a DML target
    /// to a CTE: `WITH orders AS (...) DELETE FROM orders` deletes from the table); a table
    /// joined to it may be a CTE.
    fn write_factor(&mut self, factor: &TableFactor, target: bool) {
        if let TableFactor::Table { name, .. } = factor
            && (target || !self.is_cte(name))
        {
            self.write(name);
        }
    }

    /// An `UPDATE`'s or `DELETE`'s tables: each relation is a target; MySQL's multi-table
    /// forms write the joined tables too (more than may change: never less).
    fn write_joined(&mut self, tables: &[TableWithJoins]) {
        for t in tables {
            self.write_factor(&t.relation, true);
            for j in &t.joins {
                self.write_factor(&j.relation, false);
            }
        }
    }

    /// A MySQL multi-table `DELETE`'s target (`DELETE a FROM orders a ...`, `DELETE FROM a
    /// USING orders AS a ...`), which may be an alias of a table in `scope`: the table is
    /// written, not the alias. Returns whether `name` was an alias.
    fn write_target(&mut self, name: &ObjectName, scope: &[TableWithJoins]) -> bool {
        if let [ObjectNamePart::Identifier(ident)] = name.0.as_slice() {
            let mut aliased = Vec::new();
            for t in scope {
                aliases(t, &mut aliased);
            }
            // An alias as written first (MySQL compares them case-sensitively on most systems),
            // then, for an unquoted name, ignoring case.
            let table = aliased
                .iter()
                .find(|(alias, _)| alias.value == ident.value)
                .or_else(|| {
                    aliased.iter().find(|(alias, _)| {
                        ident.quote_style.is_none()
                            && alias.quote_style.is_none()
                            && alias.value.eq_ignore_ascii_case(&ident.value)
                    })
                })
                .map(|(_, table)| *table);
            if let Some(table) = table {
                self.write(table);
                return true;
            }
        }
        self.write(name);
        false
    }

    /// `TABLE name` (a query body that names a table without `FROM`).
    fn table_commands(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Table(t) => {
                if let Some(table) = &t.table_name {
                    let mut parts: Vec<String> = t.schema_name.iter().cloned().collect();
                    parts.push(table.clone());
                    let name = TableName(parts.iter().map(|p| p.to_lowercase()).collect());
                    self.fp.reads.insert(name);
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.table_commands(left);
                self.table_commands(right);
            }
            _ => {}
        }
    }

    /// The top frame's position for a CTE body `query`, if it is one.
    fn cte_index(&self, query: &Query) -> Option<usize> {
        self.frames
            .last()?
            .bodies
            .iter()
            .position(|b| ptr::eq(*b, query))
    }
}

impl Visitor for Collector {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(i) = self.cte_index(query)
            && let Some(frame) = self.frames.last_mut()
        {
            // A non-recursive CTE sees the CTEs before it; a recursive one sees all.
            frame.active = if frame.recursive {
                frame.names.len()
            } else {
                i
            };
        }
        let mut frame = Frame::default();
        if let Some(with) = &query.with {
            frame.recursive = with.recursive;
            for cte in &with.cte_tables {
                frame.names.push(cte.alias.name.value.to_lowercase());
                frame.bodies.push(ptr::addr_of!(*cte.query));
            }
            frame.active = if with.recursive { frame.names.len() } else { 0 };
        }
        self.frames.push(frame);
        self.table_commands(&query.body);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.frames.pop();
        if let Some(i) = self.cte_index(query)
            && let Some(frame) = self.frames.last_mut()
        {
            // After CTE i: the next CTE (or the body, after the last) sees one more.
            frame.active = if frame.recursive {
                frame.names.len()
            } else {
                i + 1
            };
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name,
            args: Some(_),
            ..
        } = factor
        {
            self.functions.push(ptr::addr_of!(*name));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if self.functions.iter().any(|f| ptr::eq(*f, relation)) || self.is_cte(relation) {
            return ControlFlow::Continue(());
        }
        self.fp.reads.insert(TableName::from_object_name(relation));
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if let Some(into) = &select.into {
            for target in &into.targets {
                let parts = match target {
                    Expr::Identifier(ident) => vec![ident.value.to_lowercase()],
                    Expr::CompoundIdentifier(idents) => {
                        idents.iter().map(|i| i.value.to_lowercase()).collect()
                    }
                    _ => continue,
                };
                self.fp.writes.insert(TableName(parts));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        match statement {
            Statement::Insert(insert) => {
                if let TableObject::TableName(name) = &insert.table {
                    self.write(name);
                }
            }
            Statement::Update(update) => self.write_joined(std::slice::from_ref(&update.table)),
            Statement::Delete(delete) => {
                let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) =
                    &delete.from;
                match (&delete.tables[..], &delete.using) {
                    // `DELETE FROM a USING orders AS a ...`: the targets name USING's tables.
                    ([], Some(using)) => {
                        for t in from {
                            // A target with an alias of its own is a table (PostgreSQL's
                            // `DELETE FROM orders o USING archive AS orders`: `orders` is the
                            // table, its name hidden by `o` — review, helper-73).
                            if let TableFactor::Table { name, alias, .. } = &t.relation
                                && if alias.is_some() {
                                    self.write(name);
                                    false
                                } else {
                                    self.write_target(name, using)
                                }
                            {
                                // An alias in FROM, visited as a relation: not a table read.
                                self.functions.push(ptr::addr_of!(*name));
                            }
                        }
                    }
                    ([], None) => self.write_joined(from),
                    // `DELETE a, i FROM orders a JOIN items i ...`.
                    (targets, _) => {
                        for name in targets {
                            let _ = self.write_target(name, from);
                        }
                    }
                }
            }
            Statement::Merge(merge) => self.write_factor(&merge.table, true),
            Statement::Truncate(truncate) => {
                for target in &truncate.table_names {
                    self.write(&target.name);
                }
            }
            Statement::Copy {
                source: CopySource::Table { table_name, .. },
                to: false,
                ..
            } => self.write(table_name),
            Statement::LoadData { table_name, .. } => self.write(table_name),
            Statement::Drop {
                object_type: ObjectType::Table | ObjectType::View | ObjectType::MaterializedView,
                names,
                ..
            } => {
                for name in names {
                    self.write(name);
                }
            }
            Statement::CreateTable(create) => self.write(&create.name),
            Statement::CreateView(create) => self.write(&create.name),
            Statement::CreateVirtualTable { name, .. } | Statement::AlterView { name, .. } => {
                self.write(name);
            }
            Statement::AlterTable(alter) => self.write(&alter.name),
            Statement::RenameTable(renames) => {
                for r in renames {
                    self.write(&r.old_name);
                    self.write(&r.new_name);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}
