//! The scope vocabulary (`keygate_scopes`, migration 4): the scopes a server's routes
//! require, registered at start-up so the `keygate` CLI can refuse a key whose scope is a
//! typo.

use std::time::SystemTime;

use keygate_core::{KnownScope, ScopeVocabulary, StoreError};

use crate::error::unavailable;
use crate::row;
use crate::store::{Pool, SqlStore};

impl SqlStore {
    /// Records the scopes a server's routes require (build the vocabulary from its route
    /// table, for example with `RouteScopes::scopes` in the `keygate` crate), in one
    /// transaction. Scopes already registered are kept (several servers may share a
    /// store), with `needs_collection` taken from this call.
    pub async fn register_scopes(&self, vocabulary: &ScopeVocabulary) -> Result<(), StoreError> {
        let scopes = vocabulary.scopes();
        let now = row::to_ms(SystemTime::now());
        const UPSERT: &str = "INSERT INTO keygate_scopes (scope, needs_collection, registered_at) \
             VALUES ($1, $2, $3) ON CONFLICT (scope) DO UPDATE SET \
             needs_collection = excluded.needs_collection, registered_at = excluded.registered_at";
        self.timed("register_scopes", async {
            let done: Result<(), sqlx::Error> = match &self.inner.pool {
                Pool::Sqlite(pool) => {
                    async {
                        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                        for k in scopes {
                            sqlx::query(UPSERT)
                                .bind(&k.scope)
                                .bind(k.needs_collection)
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                        }
                        tx.commit().await
                    }
                    .await
                }
                Pool::Postgres(pool) => {
                    async {
                        let mut tx = pool.begin().await?;
                        for k in scopes {
                            sqlx::query(UPSERT)
                                .bind(&k.scope)
                                .bind(k.needs_collection)
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                        }
                        tx.commit().await
                    }
                    .await
                }
            };
            done.map_err(|e| unavailable("register_scopes", e))
        })
        .await
    }

    /// The registered scope vocabulary (empty when no server has registered one). Rows
    /// that are not valid scopes are skipped.
    pub async fn scope_vocabulary(&self) -> Result<ScopeVocabulary, StoreError> {
        self.timed("scope_vocabulary", async {
            let rows: Vec<(String, bool)> = match &self.inner.pool {
                Pool::Sqlite(pool) => {
                    sqlx::query_as("SELECT scope, needs_collection FROM keygate_scopes")
                        .fetch_all(pool)
                        .await
                }
                Pool::Postgres(pool) => {
                    sqlx::query_as("SELECT scope, needs_collection FROM keygate_scopes")
                        .fetch_all(pool)
                        .await
                }
            }
            .map_err(|e| unavailable("scope_vocabulary", e))?;
            Ok(ScopeVocabulary::new(
                rows.into_iter().map(|(s, n)| KnownScope::new(s, n)),
            ))
        })
        .await
    }
}
