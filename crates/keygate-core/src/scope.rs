//! Scopes (`points:read`, `points:*`, `*`) and resource patterns (`tenant-*`), parsed and
//! compiled once per key, matched without allocation.
//!
//! ```
//! use keygate_core::{Scope, ScopeSet, ResourceSet};
//!
//! let granted = ScopeSet::compile(["points:*", "collections:read"]);
//! assert!(granted.allows(&Scope::parse("points:write").unwrap()));
//! assert!(!granted.allows(&Scope::parse("collections:manage").unwrap()));
//!
//! let collections = ResourceSet::compile(["tenant-*", "shared"]);
//! assert!(collections.allows("tenant-acme"));
//! assert!(!collections.allows("other"));
//! ```

use std::fmt;

/// Why a scope or resource pattern is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {text:?}: {reason}")]
pub struct InvalidScope {
    what: &'static str,
    text: String,
    reason: &'static str,
}

impl InvalidScope {
    fn new(what: &'static str, text: &str, reason: &'static str) -> Self {
        InvalidScope {
            what,
            text: text.chars().take(64).collect(),
            reason,
        }
    }
}

fn valid_word(w: &str) -> bool {
    !w.is_empty()
        && w.len() <= 64
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// One scope: `resource:action`, where either side may be `*`; `*` alone means everything.
///
/// Words are 1 to 64 characters of `[A-Za-z0-9_.-]`, compared exactly (case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    resource: Box<str>,
    action: Box<str>,
}

impl Scope {
    /// Parses `resource:action`, `resource:*`, `*:action` or `*`.
    pub fn parse(text: &str) -> Result<Self, InvalidScope> {
        if text == "*" {
            return Ok(Scope {
                resource: "*".into(),
                action: "*".into(),
            });
        }
        let (resource, action) = text
            .split_once(':')
            .ok_or_else(|| InvalidScope::new("scope", text, "expected resource:action or *"))?;
        for part in [resource, action] {
            if part != "*" && !valid_word(part) {
                return Err(InvalidScope::new(
                    "scope",
                    text,
                    "each side is * or 1 to 64 characters of [A-Za-z0-9_.-]",
                ));
            }
        }
        Ok(Scope {
            resource: resource.into(),
            action: action.into(),
        })
    }

    /// The resource side (`points`).
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The action side (`read`).
    pub fn action(&self) -> &str {
        &self.action
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if &*self.resource == "*" && &*self.action == "*" {
            f.write_str("*")
        } else {
            write!(f, "{}:{}", self.resource, self.action)
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = InvalidScope;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::parse(s)
    }
}

/// The scopes a key grants, compiled for matching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    everything: bool,
    any_action_on: Vec<Box<str>>,
    action_on_any: Vec<Box<str>>,
    exact: Vec<Scope>,
}

impl ScopeSet {
    /// Compiles granted scope strings. Invalid entries grant nothing (fail closed); validate
    /// with [`Scope::parse`] when keys are issued so there are none.
    pub fn compile<I, T>(scopes: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let mut set = ScopeSet::default();
        for text in scopes {
            let Ok(s) = Scope::parse(text.as_ref()) else {
                continue;
            };
            match (&*s.resource, &*s.action) {
                ("*", "*") => set.everything = true,
                (r, "*") => set.any_action_on.push(r.into()),
                ("*", a) => set.action_on_any.push(a.into()),
                _ => set.exact.push(s),
            }
        }
        set
    }

    /// Whether the set grants `required` (which may itself use wildcards: `points:*` is
    /// granted only by `points:*` or `*`).
    pub fn allows(&self, required: &Scope) -> bool {
        if self.everything {
            return true;
        }
        let (r, a) = (&*required.resource, &*required.action);
        if r != "*" && self.any_action_on.iter().any(|x| &**x == r) {
            return true;
        }
        if a != "*" && self.action_on_any.iter().any(|x| &**x == a) {
            return true;
        }
        self.exact.iter().any(|s| s == required)
    }

    /// Whether the set grants nothing.
    pub fn is_empty(&self) -> bool {
        !self.everything
            && self.any_action_on.is_empty()
            && self.action_on_any.is_empty()
            && self.exact.is_empty()
    }
}

/// The resources (collections) a key may touch, compiled for matching.
///
/// Patterns: an exact name, `*` (every resource), or a glob with `*` standing for any run
/// of characters (`tenant-*`, `*-public`). **A key with no patterns may touch no
/// resource**: access to collections is granted explicitly, never by omission.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceSet {
    any: bool,
    exact: Vec<Box<str>>,
    globs: Vec<Box<str>>,
}

/// Checks a resource pattern: 1 to 128 characters, no control characters or `/`.
pub fn validate_resource_pattern(p: &str) -> Result<(), InvalidScope> {
    if p.is_empty() || p.len() > 128 {
        return Err(InvalidScope::new(
            "resource pattern",
            p,
            "must be 1 to 128 characters",
        ));
    }
    if p.chars().any(|c| c.is_control() || c == '/') {
        return Err(InvalidScope::new(
            "resource pattern",
            p,
            "must not contain control characters or /",
        ));
    }
    Ok(())
}

impl ResourceSet {
    /// Compiles resource patterns. Invalid patterns grant nothing.
    pub fn compile<I, T>(patterns: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let mut set = ResourceSet::default();
        for p in patterns {
            let p = p.as_ref();
            if validate_resource_pattern(p).is_err() {
                continue;
            }
            if p == "*" {
                set.any = true;
            } else if p.contains('*') {
                set.globs.push(p.into());
            } else {
                set.exact.push(p.into());
            }
        }
        set
    }

    /// Whether `resource` is allowed.
    pub fn allows(&self, resource: &str) -> bool {
        self.any
            || self.exact.iter().any(|e| &**e == resource)
            || self
                .globs
                .iter()
                .any(|g| glob_match(g.as_bytes(), resource.as_bytes()))
    }

    /// Whether no resource is allowed.
    pub fn is_empty(&self) -> bool {
        !self.any && self.exact.is_empty() && self.globs.is_empty()
    }
}

/// `*` matches any run of bytes (including none); everything else matches itself.
/// Iterative with one backtrack point: linear in practice, no recursion.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Scope {
        Scope::parse(t).unwrap()
    }

    #[test]
    fn scope_parsing() {
        assert_eq!(s("points:read").resource(), "points");
        assert_eq!(s("*").to_string(), "*");
        assert_eq!(s("points:*").to_string(), "points:*");
        for bad in [
            "",
            "points",
            ":read",
            "points:",
            "a:b:c",
            "po ints:read",
            "p/x:read",
            "*:",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcards_grant_as_documented() {
        let set = ScopeSet::compile(["points:*", "*:read", "keys:admin", "garbage!"]);
        assert!(set.allows(&s("points:write")));
        assert!(set.allows(&s("points:*")));
        assert!(set.allows(&s("collections:read")));
        assert!(set.allows(&s("keys:admin")));
        assert!(!set.allows(&s("keys:write")));
        assert!(!set.allows(&s("collections:manage")));
        assert!(!set.allows(&s("*")));
        assert!(ScopeSet::compile(["*"]).allows(&s("anything:at_all")));
        assert!(ScopeSet::compile(["garbage!"]).is_empty());
        assert!(ScopeSet::compile(Vec::<String>::new()).is_empty());
    }

    #[test]
    fn resources() {
        let set = ResourceSet::compile(["tenant-*", "*-public", "exact", "a*b*c"]);
        for ok in [
            "tenant-",
            "tenant-acme",
            "docs-public",
            "exact",
            "abc",
            "aXbYc",
            "abbbc",
        ] {
            assert!(set.allows(ok), "{ok}");
        }
        for no in ["tenant", "exac", "exactly", "public", "ab", "acb", ""] {
            assert!(!set.allows(no), "{no}");
        }
        assert!(ResourceSet::compile(["*"]).allows("anything"));
        assert!(!ResourceSet::default().allows("anything"));
        assert!(ResourceSet::compile(["a/b", ""]).is_empty());
    }

    #[test]
    fn glob_is_linear_on_adversarial_input() {
        let pattern = "*a*a*a*a*a*a*a*a*b";
        let text = "a".repeat(10_000);
        assert!(!glob_match(pattern.as_bytes(), text.as_bytes()));
    }
}
