//! Hiding credentials in connection strings before they are printed or logged.

/// The names of key/value parameters whose value is a credential (compared ignoring
/// case): in URL query strings (`?password=...`) and in key/value connection strings
/// (`host=db password=... dbname=keys`).
const SECRET_PARAMS: [&str; 11] = [
    "password",
    "passwd",
    "pass",
    "pwd",
    "sslpassword",
    "secret",
    "token",
    "auth",
    "api_key",
    "apikey",
    "access_key",
];

/// What a hidden credential is replaced with.
pub const REDACTED: &str = "***";

/// `text` (a database or Redis URL, or a key/value connection string) with every
/// credential replaced by `***`:
///
/// - the password of a URL's user information (`postgres://user:***@host/db`,
///   `redis://:***@host`);
/// - the value of a credential parameter (`password`, `pass`, `pwd`, `sslpassword`,
///   `secret`, `token`, `auth`, `api_key`, ...) in a query string (`?password=***&...`) or
///   in a key/value string (`password=***`, `password='***'`).
///
/// Anything else is kept, so the result still says which server and database were meant.
///
/// ```
/// use keygate_core::redact_url;
///
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/keys"), "postgres://app:***@db:5432/keys");
/// assert_eq!(redact_url("postgres://db/keys?user=app&password=s3cret"), "postgres://db/keys?user=app&password=***");
/// assert_eq!(redact_url("host=db password='a b' dbname=keys"), "host=db password=*** dbname=keys");
/// assert_eq!(redact_url("sqlite://keygate.db"), "sqlite://keygate.db");
/// ```
pub fn redact_url(text: &str) -> String {
    let text = redact_userinfo(text);
    redact_params(&text)
}

/// `scheme://user:password@rest` with the password hidden. The user information ends at
/// the last `@` before the query or fragment (a password may hold `@` and `/`).
fn redact_userinfo(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_owned();
    };
    let start = scheme_end + 3;
    let rest = &text[start..];
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..end].rfind('@') else {
        return text.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:{REDACTED}{}",
            &text[..start],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => text.to_owned(),
    }
}

/// Hides the values of credential parameters: `NAME=value` where NAME (ignoring case) is
/// one of [`SECRET_PARAMS`] and starts the text or follows `?`, `&`, `;` or whitespace.
/// The value runs to the next `&`, `;`, `#` or whitespace, or is quoted (`'...'`, `"..."`,
/// with backslash escapes).
fn redact_params(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let boundary = i == 0 || matches!(bytes[i - 1], b'?' | b'&' | b';' | b' ' | b'\t' | b'\n');
        if !boundary {
            i += 1;
            continue;
        }
        let Some(name_len) = SECRET_PARAMS.iter().find_map(|p| {
            let n = p.len();
            let name = bytes.get(i..i + n)?;
            if !name.eq_ignore_ascii_case(p.as_bytes()) {
                return None;
            }
            // Spaces are allowed around `=` in key/value strings.
            let mut j = i + n;
            while bytes.get(j).is_some_and(|b| *b == b' ') {
                j += 1;
            }
            (bytes.get(j) == Some(&b'=')).then_some(j + 1 - i)
        }) else {
            i += 1;
            continue;
        };
        let mut v = i + name_len;
        while bytes.get(v).is_some_and(|b| *b == b' ') {
            v += 1;
        }
        let value_end = match bytes.get(v) {
            Some(&q @ (b'\'' | b'"')) => {
                let mut k = v + 1;
                while k < bytes.len() && bytes[k] != q {
                    k += if bytes[k] == b'\\' { 2 } else { 1 };
                }
                (k + 1).min(bytes.len())
            }
            _ => {
                let mut k = v;
                while k < bytes.len()
                    && !matches!(bytes[k], b'&' | b';' | b'#' | b' ' | b'\t' | b'\n')
                {
                    k += 1;
                }
                k
            }
        };
        out.push_str(&text[copied..v]);
        out.push_str(REDACTED);
        copied = value_end;
        i = value_end.max(i + 1);
    }
    out.push_str(&text[copied.min(text.len())..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_credential_form_is_hidden() {
        for (input, expected) in [
            (
                "postgres://app:s3cret@db:5432/keys",
                "postgres://app:***@db:5432/keys",
            ),
            (
                "postgresql://app:p@ss/w0rd@db/keys?sslmode=require",
                "postgresql://app:***@db/keys?sslmode=require",
            ),
            ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
            ("redis://user@cache", "redis://user@cache"),
            (
                "postgres://db/keys?user=app&password=s3cret&sslmode=require",
                "postgres://db/keys?user=app&password=***&sslmode=require",
            ),
            (
                "postgres://db/keys?PASSWORD=s3cret",
                "postgres://db/keys?PASSWORD=***",
            ),
            (
                "postgres://a:b@db/keys?sslpassword=x#frag",
                "postgres://a:***@db/keys?sslpassword=***#frag",
            ),
            (
                "host=db user=app password=s3cret dbname=keys",
                "host=db user=app password=*** dbname=keys",
            ),
            (
                "host=db password = 's3 c\\'ret' dbname=keys",
                "host=db password = *** dbname=keys",
            ),
            ("password=x", "password=***"),
            (
                "sqlite:///var/lib/keygate.db",
                "sqlite:///var/lib/keygate.db",
            ),
            // Names that merely end like a credential parameter are kept.
            ("host=db nopassword=1", "host=db nopassword=1"),
            ("", ""),
            ("password='unterminated", "password=***"),
        ] {
            assert_eq!(redact_url(input), expected, "{input}");
        }
    }
}
