//! Key parsing and checksum; credential extraction from a header map and URI.

use std::borrow::Cow;

use arbitrary::{Arbitrary, Unstructured};
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::{HeaderMap, Uri};
use keygate::credentials::{CredentialSource, Credentials};
use keygate::{KeyParseError, KeyParser, Prefix, BODY_LEN, CHECKSUM_LEN, KEY_ID_LEN};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The documented key format, written plainly: `{prefix}_{40 base62}` where the last six
/// characters are the base62 CRC32 of everything before them.
pub(crate) fn reference_parse<'a>(
    prefixes: &[&str],
    presented: &'a str,
) -> Result<(&'a str, &'a str, &'a str), KeyParseError> {
    if presented.is_empty() {
        return Err(KeyParseError::Empty);
    }
    if presented.len() > 32 + 1 + 40 {
        return Err(KeyParseError::TooLong);
    }
    let Some(sep) = presented.rfind('_') else {
        return Err(KeyParseError::MissingSeparator);
    };
    let (prefix, body) = (&presented[..sep], &presented[sep + 1..]);
    if !prefixes.contains(&prefix) {
        return Err(KeyParseError::UnknownPrefix);
    }
    if body.len() != 40 {
        return Err(KeyParseError::BadLength);
    }
    if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(KeyParseError::BadCharacter);
    }
    if body.as_bytes()[34..] != reference_checksum(&presented.as_bytes()[..presented.len() - 6]) {
        return Err(KeyParseError::BadChecksum);
    }
    Ok((prefix, &body[..12], &body[12..34]))
}

fn reference_checksum(head: &[u8]) -> [u8; 6] {
    let mut n = u64::from(crc32fast::hash(head));
    let mut out = [0u8; 6];
    for i in (0..6).rev() {
        out[i] = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Key parsing against the reference. The first byte picks a mode: odd modes repair the
/// checksum of a well-shaped input first, so the accepting path is explored too.
pub fn key(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut text = text.to_owned();
    if mode & 1 == 1 && text.is_ascii() && text.len() > CHECKSUM_LEN {
        let head = text.len() - CHECKSUM_LEN;
        let sum = reference_checksum(&text.as_bytes()[..head]);
        text.truncate(head);
        text.push_str(std::str::from_utf8(&sum).expect("base62 is ASCII"));
    }
    let prefixes = ["kg", "sk_live", "a1"];
    let parser = KeyParser::new(
        prefixes
            .iter()
            .map(|p| Prefix::new(p).expect("valid prefix")),
    );
    let got = parser.parse(&text);
    let want = reference_parse(&prefixes, &text);
    match (&got, &want) {
        (Ok(k), Ok((prefix, id, secret))) => {
            assert_eq!(k.prefix(), *prefix);
            assert_eq!(k.id().as_str(), *id);
            assert_eq!(k.secret(), *secret);
            assert_eq!(k.id().as_str().len(), KEY_ID_LEN);
            assert!(
                !format!("{k:?}").contains(*secret),
                "Debug shows the secret"
            );
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "error for {text:?}"),
        _ => panic!("parser and reference disagree on {text:?}: {got:?} vs {want:?}"),
    }
    if let Err(e) = got {
        // Messages never contain the credential.
        let message = e.to_string();
        for run in key_like_runs(text.as_bytes()) {
            assert!(!message.as_bytes().windows(run.len()).any(|w| w == run));
        }
    }
    let _ = BODY_LEN;
}

#[derive(Debug, Arbitrary)]
enum Name {
    Authorization,
    XApiKey,
    ApiKey,
    Custom,
    Other,
}

impl Name {
    fn header(&self) -> HeaderName {
        match self {
            Name::Authorization => AUTHORIZATION,
            Name::XApiKey => HeaderName::from_static("x-api-key"),
            Name::ApiKey => HeaderName::from_static("api-key"),
            Name::Custom => HeaderName::from_static("x-custom-key"),
            Name::Other => HeaderName::from_static("x-other"),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct CredentialInput {
    headers: Vec<(Name, Vec<u8>)>,
    query: Option<String>,
    with_query: bool,
    with_custom: bool,
}

/// The documented extraction, written plainly over strings.
fn reference_extract<'a>(
    sources: &[CredentialSource],
    headers: &'a HeaderMap,
    uri: &'a Uri,
) -> Result<Option<Cow<'a, str>>, ()> {
    let ows: &[char] = &[' ', '\t'];
    let mut found: Option<Cow<'a, str>> = None;
    let mut offer = |c: Cow<'a, str>| match &found {
        Some(prev) if *prev != c => Err(()),
        Some(_) => Ok(()),
        None => {
            found = Some(c);
            Ok(())
        }
    };
    for source in sources {
        match source {
            CredentialSource::Bearer => {
                for v in headers.get_all(AUTHORIZATION) {
                    let text = v.to_str().map_err(|_| ())?.trim_matches(ows);
                    if text.is_empty() {
                        return Err(());
                    }
                    let (scheme, token) = text.split_once(ows).unwrap_or((text, ""));
                    if !scheme.eq_ignore_ascii_case("bearer") {
                        continue;
                    }
                    let token = token.trim_matches(ows);
                    if token.is_empty() || token.contains(ows) {
                        return Err(());
                    }
                    offer(Cow::Borrowed(token))?;
                }
            }
            CredentialSource::Header(name) => {
                for v in headers.get_all(name) {
                    let text = v.to_str().map_err(|_| ())?.trim_matches(ows);
                    if text.is_empty() {
                        return Err(());
                    }
                    offer(Cow::Borrowed(text))?;
                }
            }
            CredentialSource::Query(param) => {
                let Some(query) = uri.query() else { continue };
                for pair in query.split('&') {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if name != param.as_ref() {
                        continue;
                    }
                    let value = form_decode(value);
                    if value.is_empty() {
                        return Err(());
                    }
                    offer(value)?;
                }
            }
            _ => return Err(()),
        }
    }
    Ok(found)
}

/// `application/x-www-form-urlencoded` value decoding: `+` is a space, `%XX` a byte (a `%`
/// not followed by two hex digits stays), then UTF-8 with replacement characters.
fn form_decode(value: &str) -> Cow<'_, str> {
    if !value.contains(['%', '+']) {
        return Cow::Borrowed(value);
    }
    let b = value.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Whether `text` holds `_` followed by 40 or more base62 characters (a key's body).
fn has_key_body(text: &str) -> bool {
    text.split('_')
        .skip(1)
        .any(|after| after.bytes().take_while(u8::is_ascii_alphanumeric).count() >= 40)
}

/// Whether `text` holds a run of 20 or more base62 characters (something key-like).
fn key_like_runs(text: &[u8]) -> Vec<&[u8]> {
    text.split(|b| !b.is_ascii_alphanumeric())
        .filter(|run| run.len() >= 20)
        .collect()
}

/// Credential extraction against the reference; the missing-key denial never echoes a
/// key-like value.
pub fn credentials(data: &[u8]) {
    let Ok(input) = CredentialInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name.header(), v);
        }
    }
    let uri: Uri = match &input.query {
        Some(q) => match format!("/p?{q}").parse() {
            Ok(u) => u,
            Err(_) => return,
        },
        None => Uri::from_static("/p"),
    };
    let mut creds = Credentials::default();
    if input.with_custom {
        creds = creds.with_header(HeaderName::from_static("x-custom-key"));
    }
    if input.with_query {
        creds = creds.with_query("api_key");
    }
    let got = creds.extract(&headers, &uri);
    let want = reference_extract(creds.sources(), &headers, &uri);
    match (&got, &want) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(d), Err(())) => {
            assert_eq!(d.code(), keygate::DenialCode::MalformedKey);
        }
        _ => panic!("extract and reference disagree: {got:?} vs {want:?} on {headers:?} {uri}"),
    }
    if let Ok(None) = got {
        // Nothing of the key format (`_` then 40 base62 characters) in the detail: the
        // request's own text is echoed only as short, non-key-shaped names.
        let denial = creds.missing(&headers, &uri, &[Prefix::default()]);
        assert!(
            !has_key_body(denial.detail()),
            "the missing-key detail shows a key: {:?}",
            denial.detail()
        );
    }
}
