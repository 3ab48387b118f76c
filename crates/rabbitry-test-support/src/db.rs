//! Databases for tests: a fresh SQLite file, a fresh PostgreSQL schema.

/// A PostgreSQL URL whose `search_path` is a fresh schema, so tests that
/// share the database (`DATABASE_URL`, else the local `test` database) do
/// not share tables.
pub async fn pg_url() -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pool = sqlx::PgPool::connect(&base)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    format!("{base}?options=-c%20search_path%3D{schema}")
}

/// A SQLite URL for a file in a fresh folder.
pub fn sqlite_url() -> String {
    let dir = std::env::temp_dir().join(crate::unique("db"));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}/outbox.db", dir.display())
}
