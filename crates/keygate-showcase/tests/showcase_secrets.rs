//! The showcase's URL redaction: every way a connection string carries a password.

mod showcase_support;

use showcase_support::server::secrets::redact;

#[test]
fn passwords_are_hidden_wherever_a_url_carries_them() {
    for (url, want) in [
        (
            "postgres://app:pw@db:5432/keys",
            "postgres://app:***@db:5432/keys",
        ),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        (
            "postgres://app@db/keys?password=pw&sslmode=require",
            "postgres://app@db/keys?password=***&sslmode=require",
        ),
        (
            "postgres://db/keys?sslmode=require&PassWord=pw#x",
            "postgres://db/keys?sslmode=require&PassWord=***#x",
        ),
        (
            "postgres://db/keys?sslpassword=pw",
            "postgres://db/keys?sslpassword=***",
        ),
        ("postgres://a:b@c@db/keys", "postgres://a:***@db/keys"),
        (
            "host=db user=app password=pw dbname=keys",
            "host=db user=app password=*** dbname=keys",
        ),
        (
            "host=db password='p w\\' x' dbname=keys",
            "host=db password=*** dbname=keys",
        ),
        ("sqlite://keygate.db", "sqlite://keygate.db"),
        (
            "postgres://app@db/keys?application_name=x",
            "postgres://app@db/keys?application_name=x",
        ),
    ] {
        let got = redact(url);
        assert_eq!(got, want, "{url}");
        assert!(!got.contains("pw") && !got.contains("p w"), "{got}");
    }
}
