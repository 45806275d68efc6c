//! SqlCache on MySQL / MariaDB (own database per test): the common suite, every parameter and
//! value type, typed errors.
#![cfg(feature = "mysql")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use ncm_cache_sql::{
    MySqlExecutor, QueryCacheStrategy, SqlCache, SqlExecutor, SqlValue, database_error_code, params,
};
use support::{Probe, common_suite, memory_cache, my};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn common_suite_on_mysql() {
    let Some(db) = my::db("common_suite_on_mysql").await else {
        return;
    };
    let executor = MySqlExecutor::new(db.pool.clone());
    assert!(
        executor.identity().ends_with(&db.database),
        "{}",
        executor.identity()
    );
    let probe = Arc::new(Probe::new(executor));
    let cache = SqlCache::builder_shared(memory_cache(), probe.clone())
        .build()
        .unwrap();
    common_suite(&cache, &probe).await;
}

fn ts() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_parameter_and_column_type_on_mysql() {
    let Some(db) = my::db("every_parameter_and_column_type_on_mysql").await else {
        return;
    };
    let cache = SqlCache::builder(memory_cache(), MySqlExecutor::new(db.pool.clone()))
        .build()
        .unwrap();
    cache
        .execute(
            "CREATE TABLE t (id INT AUTO_INCREMENT PRIMARY KEY, n INT NULL, b BOOLEAN, \
             ti TINYINT, i INT, bi BIGINT, ub BIGINT UNSIGNED, f FLOAT, d DOUBLE, \
             s VARCHAR(100), tx TEXT, x VARBINARY(16), bl BLOB, dt DATETIME(6), \
             tsz TIMESTAMP(6) NULL, j JSON, dec_col DECIMAL(12, 4), day DATE, tm TIME, \
             e ENUM('red', 'green'))",
            (),
        )
        .await
        .unwrap();
    let json = serde_json::json!({"a": [1, 2.5, null], "b": {"c": "d"}});
    cache
        .execute(
            "INSERT INTO t (n, b, ti, i, bi, ub, f, d, s, tx, x, bl, dt, tsz, j, dec_col, day, tm, e) \
             VALUES (%s, %s, %s, %s, %s, 18446744073709551615, %s, %s, %s, %s, %s, %s, %s, %s, %s, \
             12.5, '2024-02-29', '13:14:15', 'green')",
            params![
                SqlValue::Null,
                true,
                -128,
                2_147_483_647,
                i64::MIN,
                1.5,
                -0.1,
                "O'Reilly %s :x ? \\ back",
                "text",
                vec![0u8, 1, 255],
                vec![9u8; 3],
                ts(),
                ts(),
                json.clone()
            ],
        )
        .await
        .unwrap();
    let sql = "SELECT n, b, ti, i, bi, ub, f, d, s, tx, x, bl, dt, tsz, j, dec_col, day, tm, e FROM t \
               WHERE b = %(b)s AND bi = %(bi)s AND d = %(d)s AND s = %(s)s AND x = %(x)s \
               AND dt = %(ts)s AND tsz = %(ts)s AND (n = %(null)s OR n IS NULL)";
    let named = params! {
        "b" => true, "bi" => i64::MIN, "d" => -0.1, "s" => "O'Reilly %s :x ? \\ back",
        "x" => vec![0u8, 1, 255], "ts" => ts(), "null" => SqlValue::Null
    };
    let rows = cache.query(sql, named.clone()).await.unwrap();
    assert_eq!(rows.len(), 1, "every bound type matches");
    let get = |c: &str| rows.get(0, c).cloned().unwrap();
    assert_eq!(get("n"), SqlValue::Null);
    assert_eq!(get("b"), SqlValue::Bool(true));
    assert_eq!(get("ti"), SqlValue::Int(-128));
    assert_eq!(get("i"), SqlValue::Int(2_147_483_647));
    assert_eq!(get("bi"), SqlValue::Int(i64::MIN));
    assert_eq!(get("ub"), SqlValue::from("18446744073709551615"));
    assert_eq!(get("f"), SqlValue::Float(1.5));
    assert_eq!(get("d"), SqlValue::Float(-0.1));
    assert_eq!(get("s"), SqlValue::from("O'Reilly %s :x ? \\ back"));
    assert_eq!(get("tx"), SqlValue::from("text"));
    assert_eq!(get("x"), SqlValue::Bytes(vec![0, 1, 255]));
    assert_eq!(get("bl"), SqlValue::Bytes(vec![9; 3]));
    assert_eq!(get("dt"), SqlValue::Timestamp(ts()));
    assert_eq!(get("tsz"), SqlValue::Timestamp(ts()));
    // MariaDB reports JSON columns as LONGTEXT; MySQL 8 as JSON.
    match get("j") {
        SqlValue::Json(j) => assert_eq!(j, json),
        SqlValue::Text(t) => {
            assert_eq!(serde_json::from_str::<serde_json::Value>(&t).unwrap(), json)
        }
        other => panic!("json column read as {other:?}"),
    }
    assert_eq!(get("dec_col"), SqlValue::from("12.5000"));
    assert_eq!(get("day"), SqlValue::from("2024-02-29"));
    assert_eq!(get("tm"), SqlValue::from("13:14:15"));
    assert_eq!(get("e"), SqlValue::from("green"));
    let cached = cache
        .cache_query(sql, named, QueryCacheStrategy::CacheOnly, None)
        .await
        .unwrap();
    assert_eq!(cached, Some(rows));
    // The NULL parameter fits any column.
    cache
        .execute(
            "UPDATE t SET dt = %s, j = %s, x = %s",
            params![SqlValue::Null, SqlValue::Null, SqlValue::Null],
        )
        .await
        .unwrap();
    let nulls = cache.query("SELECT dt, j, x FROM t", ()).await.unwrap();
    assert_eq!(nulls.rows[0], vec![SqlValue::Null; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sql_returns_the_database_error_on_mysql() {
    let Some(db) = my::db("bad_sql_returns_the_database_error_on_mysql").await else {
        return;
    };
    let cache = SqlCache::builder(memory_cache(), MySqlExecutor::new(db.pool.clone()))
        .build()
        .unwrap();
    let syntax = cache.query("SELECT FROM WHERE", ()).await.unwrap_err();
    assert_eq!(
        database_error_code(&syntax).as_deref(),
        Some("42000"),
        "{syntax}"
    );
    let missing = cache
        .query("SELECT * FROM missing_table", ())
        .await
        .unwrap_err();
    assert_eq!(
        database_error_code(&missing).as_deref(),
        Some("42S02"),
        "{missing}"
    );
    for sql in ["SELECT FROM WHERE", "SELECT * FROM missing_table"] {
        assert_eq!(
            cache
                .cache_query(sql, (), QueryCacheStrategy::CacheOnly, None)
                .await
                .unwrap(),
            None
        );
    }
}

/// On MySQL/MariaDB: the identity comes from the server (and names the database), a delete
/// that cascades through a foreign key invalidates the child table's results, and a write to a
/// table invalidates the views over it (from `information_schema`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascades_views_and_server_identity_on_mysql() {
    let Some(db) = my::db("cascades_views_and_server_identity_on_mysql").await else {
        return;
    };
    let executor = MySqlExecutor::from_pool(db.pool.clone()).await.unwrap();
    assert!(
        executor
            .identity()
            .contains(&format!("/{}?user=", db.database)),
        "{}",
        executor.identity()
    );
    assert_ne!(
        executor.identity(),
        MySqlExecutor::new(db.pool.clone()).identity()
    );
    let cache = SqlCache::builder(memory_cache(), executor).build().unwrap();
    for stmt in [
        "CREATE TABLE customers (id INT PRIMARY KEY, name VARCHAR(20)) ENGINE=InnoDB",
        "CREATE TABLE orders (id INT PRIMARY KEY, customer INT, \
         FOREIGN KEY (customer) REFERENCES customers(id) ON DELETE CASCADE) ENGINE=InnoDB",
        "CREATE VIEW customer_names AS SELECT name FROM customers",
        "INSERT INTO customers VALUES (1, 'ada'), (2, 'bob')",
        "INSERT INTO orders VALUES (10, 1), (11, 2)",
    ] {
        cache.execute(stmt, ()).await.unwrap();
    }
    let orders = "SELECT count(*) AS n FROM orders";
    let names = "SELECT count(*) AS n FROM customer_names";
    assert_eq!(
        cache.query(orders, ()).await.unwrap().rows[0][0],
        SqlValue::Int(2)
    );
    assert_eq!(
        cache.query(names, ()).await.unwrap().rows[0][0],
        SqlValue::Int(2)
    );
    cache
        .execute("DELETE FROM customers WHERE id = 2", ())
        .await
        .unwrap();
    assert_eq!(
        cache.query(orders, ()).await.unwrap().rows[0][0],
        SqlValue::Int(1)
    );
    assert_eq!(
        cache.query(names, ()).await.unwrap().rows[0][0],
        SqlValue::Int(1)
    );
}

/// A statement may name another database's table (`UPDATE other_db.t`). On MySQL a database
/// is what a schema is elsewhere, so invalidations are kept per server: a write through an
/// executor connected to one database invalidates what an executor connected to the other
/// cached of that table and of the views over it, and the reverse. Before, generation keys
/// were per database and tagged with bare names, so the write invalidated `t` of the writer's
/// own database and the other database's results were served stale for their TTL (found by
/// review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_another_databases_table_invalidates_its_results_on_mysql() {
    let test = "a_write_to_another_databases_table_invalidates_its_results_on_mysql";
    let Some(one) = my::db(test).await else {
        return;
    };
    let Some(two) = my::db(test).await else {
        return;
    };
    let shared = memory_cache();
    let a = SqlCache::builder(
        shared.clone(),
        MySqlExecutor::from_pool(one.pool.clone()).await.unwrap(),
    )
    .build()
    .unwrap();
    let b = SqlCache::builder(
        shared,
        MySqlExecutor::from_pool(two.pool.clone()).await.unwrap(),
    )
    .build()
    .unwrap();
    b.execute("CREATE TABLE t (n INT)", ()).await.unwrap();
    b.execute("CREATE VIEW vt AS SELECT n FROM t", ())
        .await
        .unwrap();
    let count = |rows: ncm_cache_sql::Rows| rows.rows[0][0].clone();
    let (table, view) = (
        "SELECT count(*) AS n FROM t",
        "SELECT count(*) AS n FROM vt",
    );
    let qualified = format!("SELECT count(*) AS n FROM {}.t", two.database);
    assert_eq!(count(b.query(table, ()).await.unwrap()), SqlValue::Int(0));
    assert_eq!(count(b.query(view, ()).await.unwrap()), SqlValue::Int(0));
    assert_eq!(
        count(a.query(&qualified, ()).await.unwrap()),
        SqlValue::Int(0)
    );

    // A writes the other database's table: B's results of the table and its view go.
    a.execute(&format!("INSERT INTO {}.t VALUES (1)", two.database), ())
        .await
        .unwrap();
    assert_eq!(count(b.query(table, ()).await.unwrap()), SqlValue::Int(1));
    assert_eq!(count(b.query(view, ()).await.unwrap()), SqlValue::Int(1));
    // B writes its own table: A's result of it (named with the database) goes.
    assert_eq!(
        count(a.query(&qualified, ()).await.unwrap()),
        SqlValue::Int(1)
    );
    b.execute("INSERT INTO t VALUES (2)", ()).await.unwrap();
    assert_eq!(
        count(a.query(&qualified, ()).await.unwrap()),
        SqlValue::Int(2)
    );
}

/// MySQL's statement modifiers and a multi-table DELETE's aliases invalidate the table written
/// (review, helper-70: sqlparser read `UPDATE IGNORE orders` as a table `ignore` aliased
/// `orders`, and `DELETE a FROM orders a ...` as a delete from `a`; the cached rows of
/// `orders` were served until their TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modifiers_and_delete_aliases_invalidate_the_table_written_on_mysql() {
    let Some(db) =
        my::db("modifiers_and_delete_aliases_invalidate_the_table_written_on_mysql").await
    else {
        return;
    };
    let cache = SqlCache::builder(memory_cache(), MySqlExecutor::new(db.pool.clone()))
        .build()
        .unwrap();
    cache
        .execute("CREATE TABLE orders (id INT PRIMARY KEY, s INT)", ())
        .await
        .unwrap();
    cache
        .execute("CREATE TABLE items (order_id INT, gone BOOLEAN)", ())
        .await
        .unwrap();
    cache
        .execute(
            "INSERT INTO orders VALUES (1, 0), (2, 0), (3, 0), (4, 0), (5, 0)",
            (),
        )
        .await
        .unwrap();
    cache
        .execute("INSERT INTO items VALUES (4, true), (5, true)", ())
        .await
        .unwrap();
    let state = "SELECT count(*) AS n, CAST(COALESCE(sum(s), 0) AS SIGNED) AS s FROM orders";
    let read = || async {
        let rows = cache.query(state, ()).await.unwrap();
        (rows.rows[0][0].clone(), rows.rows[0][1].clone())
    };
    let int = |n: i64| SqlValue::Int(n);
    assert_eq!(read().await.0, int(5));
    // Each write below changes `orders`; the cached result must follow it at once.
    let steps: [(&str, i64, i64); 4] = [
        ("UPDATE IGNORE orders SET s = 1 WHERE id = 1", 5, 1),
        (
            "UPDATE LOW_PRIORITY orders SET s = s + 1 WHERE id = 2",
            5,
            2,
        ),
        ("DELETE IGNORE FROM orders WHERE id = 3", 4, 2),
        (
            "DELETE o FROM orders o JOIN items i ON i.order_id = o.id WHERE i.gone AND o.id = 4",
            3,
            2,
        ),
    ];
    for (sql, n, s) in steps {
        cache.execute(sql, ()).await.unwrap();
        assert_eq!(read().await, (int(n), int(s)), "after {sql}");
    }
    cache
        .execute(
            "DELETE FROM o USING orders AS o JOIN items i ON i.order_id = o.id WHERE i.gone",
            (),
        )
        .await
        .unwrap();
    assert_eq!(read().await.0, int(2), "after DELETE ... USING");
}
