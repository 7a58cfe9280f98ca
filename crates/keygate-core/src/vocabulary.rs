//! A server's scope vocabulary: [`ScopeVocabulary`] (documented on the type, which is public
//! where this module is not).

use std::fmt;

use crate::scope::{Scope, ScopeSet};

/// One scope a server's routes require.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KnownScope {
    /// The scope as the route table spells it (`points:read`).
    pub scope: String,
    /// Whether every route requiring it also names a collection (so a key holding it but
    /// no collection can use none of them).
    pub needs_collection: bool,
}

impl KnownScope {
    /// A known scope.
    pub fn new(scope: impl Into<String>, needs_collection: bool) -> Self {
        KnownScope {
            scope: scope.into(),
            needs_collection,
        }
    }
}

/// A scope that is not in the vocabulary, with the closest known one when there is a
/// plausible one. Its message quotes at most 64 characters of the scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct UnknownScope {
    /// The refused scope (at most 64 characters of it).
    pub scope: String,
    /// The known scope it is probably a typo of.
    pub suggestion: Option<String>,
}

impl fmt::Display for UnknownScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown scope {:?}", self.scope)?;
        match &self.suggestion {
            Some(s) => write!(f, " (did you mean `{s}`?)"),
            None => f.write_str(" (not a scope this server's routes require)"),
        }
    }
}

/// The scopes a server's routes require. An empty vocabulary means "not known": it refuses
/// nothing.
///
/// A server's scope vocabulary: the scopes its routes require, so the tools that issue keys
/// (the `keygate` CLI, the admin API) can refuse a typo (`points:raed`) when the key is
/// made instead of at its first request.
///
/// ```
/// use keygate_core::{KnownScope, ScopeVocabulary};
///
/// let vocabulary = ScopeVocabulary::new([
///     KnownScope::new("points:read", true),
///     KnownScope::new("collections:read", false),
/// ]);
/// assert!(vocabulary.check("points:read").is_ok());
/// assert!(vocabulary.check("points:*").is_ok());
/// let err = vocabulary.check("points:raed").unwrap_err();
/// assert_eq!(err.to_string(), "unknown scope \"points:raed\" (did you mean `points:read`?)");
/// // A key that may use only `points:read` but no collection reaches nothing.
/// assert!(vocabulary.reach_warning(&["points:read".into()], &[]).is_some());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeVocabulary {
    known: Vec<KnownScope>,
}

impl ScopeVocabulary {
    /// A vocabulary of these scopes (entries that do not parse as scopes are ignored; a
    /// scope listed twice needs a collection only if both entries say so).
    pub fn new<I: IntoIterator<Item = KnownScope>>(scopes: I) -> Self {
        let mut known: Vec<KnownScope> = Vec::new();
        for k in scopes {
            if Scope::parse(&k.scope).is_err() {
                continue;
            }
            match known.iter_mut().find(|e| e.scope == k.scope) {
                Some(e) => e.needs_collection &= k.needs_collection,
                None => known.push(k),
            }
        }
        known.sort();
        ScopeVocabulary { known }
    }

    /// Whether no scope is known (nothing can be checked).
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The known scopes, sorted.
    pub fn scopes(&self) -> &[KnownScope] {
        &self.known
    }

    /// Whether `scope` may be granted: a known scope, `*`, or a wildcard (`points:*`,
    /// `*:read`) whose known side is in the vocabulary. Always `Ok` for an empty
    /// vocabulary.
    pub fn check(&self, scope: &str) -> Result<(), UnknownScope> {
        if self.known.is_empty() || scope == "*" {
            return Ok(());
        }
        let parsed = Scope::parse(scope).map_err(|_| UnknownScope {
            scope: clip(scope),
            suggestion: None,
        })?;
        let parts = |k: &KnownScope| Scope::parse(&k.scope).ok();
        let ok = match (parsed.resource(), parsed.action()) {
            (r, "*") => self
                .known
                .iter()
                .filter_map(parts)
                .any(|k| k.resource() == r),
            ("*", a) => self.known.iter().filter_map(parts).any(|k| k.action() == a),
            _ => self.known.iter().any(|k| k.scope == scope),
        };
        if ok {
            return Ok(());
        }
        Err(UnknownScope {
            scope: clip(scope),
            suggestion: self.suggest(&parsed),
        })
    }

    /// Checks every scope; the first unknown one is the error.
    pub fn check_all<S: AsRef<str>>(&self, scopes: &[S]) -> Result<(), UnknownScope> {
        scopes.iter().try_for_each(|s| self.check(s.as_ref()))
    }

    /// The closest known spelling: for a wildcard the closest known side with the wildcard
    /// kept, else the closest known scope; `None` when nothing is close.
    fn suggest(&self, scope: &Scope) -> Option<String> {
        let (r, a) = (scope.resource(), scope.action());
        let candidates: Vec<String> = if a == "*" {
            self.sides(|s| s.resource().to_owned(), |side| format!("{side}:*"))
        } else if r == "*" {
            self.sides(|s| s.action().to_owned(), |side| format!("*:{side}"))
        } else {
            self.known.iter().map(|k| k.scope.clone()).collect()
        };
        let text = scope.to_string().to_ascii_lowercase();
        candidates
            .into_iter()
            .map(|c| (distance(&text, &c.to_ascii_lowercase()), c))
            .filter(|(d, c)| *d <= 2.max(c.len() / 4))
            .min()
            .map(|(_, c)| c)
    }

    fn sides(
        &self,
        side: impl Fn(&Scope) -> String,
        spell: impl Fn(&str) -> String,
    ) -> Vec<String> {
        let mut out: Vec<String> = self
            .known
            .iter()
            .filter_map(|k| Scope::parse(&k.scope).ok())
            .map(|s| side(&s))
            .filter(|s| s != "*")
            .map(|s| spell(&s))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Why a key with these scopes and collections can use none of the known routes, or
    /// `None` when it can use one (or the vocabulary is empty, so nothing is known).
    pub fn reach_warning(&self, scopes: &[String], collections: &[String]) -> Option<String> {
        if self.known.is_empty() {
            return None;
        }
        if scopes.is_empty() {
            return Some("the key grants no scope: it can use none of the server's routes".into());
        }
        let granted = ScopeSet::compile(scopes);
        let usable: Vec<&KnownScope> = self
            .known
            .iter()
            .filter(|k| Scope::parse(&k.scope).is_ok_and(|s| granted.allows(&s)))
            .collect();
        if usable.is_empty() {
            return Some(
                "none of the key's scopes is one the server's routes require: it can use none of them"
                    .into(),
            );
        }
        if collections.is_empty() && usable.iter().all(|k| k.needs_collection) {
            return Some(
                "every route these scopes open needs a collection and the key has none: it can use none of them"
                    .into(),
            );
        }
        None
    }
}

fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

/// The optimal string alignment distance (edits: insert, delete, substitute, swap two
/// neighbours), on characters. Inputs here are at most a few hundred characters.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn showcase() -> ScopeVocabulary {
        ScopeVocabulary::new([
            KnownScope::new("collections:read", false),
            KnownScope::new("collections:manage", true),
            KnownScope::new("points:read", true),
            KnownScope::new("points:write", true),
            KnownScope::new("keys:admin", false),
        ])
    }

    #[test]
    fn typos_are_refused_with_the_closest_scope() {
        let v = showcase();
        for (typo, fix) in [
            ("point:read", "points:read"),
            ("points:raed", "points:read"),
            ("Points:Read", "points:read"),
            ("points:wrte", "points:write"),
            ("poins:*", "points:*"),
            ("*:raed", "*:read"),
        ] {
            let e = v.check(typo).unwrap_err();
            assert_eq!(e.suggestion.as_deref(), Some(fix), "{typo}");
            assert_eq!(
                e.to_string(),
                format!("unknown scope {typo:?} (did you mean `{fix}`?)")
            );
        }
        let e = v.check("billing:export").unwrap_err();
        assert_eq!(e.suggestion, None);
        assert_eq!(
            e.to_string(),
            "unknown scope \"billing:export\" (not a scope this server's routes require)"
        );
        assert!(v.check("billing:*").is_err());
    }

    #[test]
    fn known_scopes_and_wildcards_of_known_families_pass() {
        let v = showcase();
        for ok in [
            "points:read",
            "keys:admin",
            "*",
            "points:*",
            "collections:*",
            "*:read",
        ] {
            assert_eq!(v.check(ok), Ok(()), "{ok}");
        }
        assert!(v.check_all(&["points:read", "points:*"]).is_ok());
        assert!(v.check_all(&["points:read", "points:raed"]).is_err());
        // Empty: nothing is known, nothing refused.
        assert!(ScopeVocabulary::default().check("anything:goes").is_ok());
    }

    #[test]
    fn keys_that_reach_nothing_are_named() {
        let v = showcase();
        let none: [String; 0] = [];
        let s = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(v.reach_warning(&s(&["points:read"]), &none).is_some());
        assert!(v.reach_warning(&s(&["points:*"]), &none).is_some());
        assert!(v
            .reach_warning(&s(&["points:read"]), &s(&["docs"]))
            .is_none());
        // collections:read lists collections without naming one.
        assert!(v
            .reach_warning(&s(&["points:read", "collections:read"]), &none)
            .is_none());
        assert!(v.reach_warning(&s(&["*"]), &none).is_none());
        assert!(v.reach_warning(&none, &s(&["docs"])).is_some());
        assert!(v.reach_warning(&s(&["other:x"]), &s(&["docs"])).is_some());
        assert!(ScopeVocabulary::default()
            .reach_warning(&s(&["points:read"]), &none)
            .is_none());
    }

    #[test]
    fn duplicates_merge() {
        let v = ScopeVocabulary::new([
            KnownScope::new("a:b", true),
            KnownScope::new("a:b", false),
            KnownScope::new("not a scope", true),
        ]);
        assert_eq!(v.scopes(), [KnownScope::new("a:b", false)]);
        assert_eq!(distance("ab", "ba"), 1);
        assert_eq!(distance("", "abc"), 3);
    }
}
