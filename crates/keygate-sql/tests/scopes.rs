//! The scope vocabulary table (migration 4) on both backends: empty until a server
//! registers, registrations add to it (several servers may share a store) and update
//! `needs_collection`, and another handle on the same database reads the same vocabulary.

mod common;

use common::*;
use keygate_core::{KnownScope, ScopeVocabulary};

async fn registered_scopes_are_read_back(db: &Db) {
    let store = db.open().await;
    assert!(store.scope_vocabulary().await.unwrap().is_empty());
    let first = ScopeVocabulary::new([
        KnownScope::new("points:read", true),
        KnownScope::new("collections:read", false),
    ]);
    store.register_scopes(&first).await.unwrap();
    assert_eq!(store.scope_vocabulary().await.unwrap(), first);
    // Registering again is idempotent; a second server's scopes are added; a changed
    // needs_collection is taken from the latest registration.
    store.register_scopes(&first).await.unwrap();
    let second = ScopeVocabulary::new([
        KnownScope::new("points:read", false),
        KnownScope::new("keys:admin", false),
    ]);
    store.register_scopes(&second).await.unwrap();
    let other = db.open().await;
    let read = other.scope_vocabulary().await.unwrap();
    assert_eq!(
        read.scopes(),
        [
            KnownScope::new("collections:read", false),
            KnownScope::new("keys:admin", false),
            KnownScope::new("points:read", false),
        ]
    );
    assert!(read.check("points:raed").is_err());
    // An empty vocabulary changes nothing.
    store
        .register_scopes(&ScopeVocabulary::default())
        .await
        .unwrap();
    assert_eq!(other.scope_vocabulary().await.unwrap(), read);
}
both!(
    sqlite_registered_scopes_are_read_back,
    postgres_registered_scopes_are_read_back,
    registered_scopes_are_read_back
);
