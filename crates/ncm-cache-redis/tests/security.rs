//! ACL users and TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use ncm_cache_core::CacheError;
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_with_the_right_password_works_and_a_wrong_one_is_an_auth_error() {
    let server = RedisServer::builder()
        .acl_user("app", "s3cret")
        .start()
        .unwrap();
    let base = |user: &str, pass: &str| {
        let mut c = RedisConfig::from_url(&format!(
            "redis://{user}:{pass}@127.0.0.1:{}/",
            server.port()
        ))
        .unwrap();
        c.health_check_interval = None;
        c.connect_timeout = Duration::from_millis(500);
        c
    };
    let err = RedisCache::connect(base("app", "wrong")).await.unwrap_err();
    assert!(
        matches!(err, CacheError::Auth(_)),
        "expected Auth, got {err:?}"
    );
    assert!(
        err.to_string().contains("password"),
        "the message says what to check: {err}"
    );

    let cache = RedisCache::connect(base("app", "s3cret")).await.unwrap();
    cache.set("k", &"v").await.unwrap();
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("v")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirepass_server_rejects_a_missing_password() {
    let server = RedisServer::builder().password("pw").start().unwrap();
    let mut c = RedisConfig::default();
    c.port = server.port();
    c.health_check_interval = None;
    let err = RedisCache::connect(c.clone()).await;
    // The handshake succeeds without a password; the first command is refused.
    match err {
        Err(e) => assert!(matches!(e, CacheError::Auth(_)), "{e:?}"),
        Ok(cache) => {
            let e = cache.set("k", &1).await.unwrap_err();
            assert!(matches!(e, CacheError::Auth(_)), "{e:?}");
        }
    }
    c.password = Some("pw".into());
    let cache = RedisCache::connect(c).await.unwrap();
    cache.set("k", &1).await.unwrap();
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_generated_certificate() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(d.join("key.pem"))
        .arg("-out")
        .arg(d.join("cert.pem"))
        .output()
        .expect("openssl must be installed for the TLS test");
    assert!(
        ok.status.success(),
        "openssl failed: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Leased for the test (see `PortLease`), as the server's own port is.
    let tls_lease = ncm_cache_testkit::PortLease::reserve().unwrap();
    let tls_port = tls_lease.port();
    let server = RedisServer::builder()
        .arg("--tls-port", tls_port.to_string())
        .arg("--tls-cert-file", d.join("cert.pem").display().to_string())
        .arg("--tls-key-file", d.join("key.pem").display().to_string())
        .arg("--tls-auth-clients", "no")
        .start()
        .unwrap();
    let _ = &server;
    let mut c =
        RedisConfig::from_url(&format!("rediss://127.0.0.1:{tls_port}/?insecure=true")).unwrap();
    c.health_check_interval = None;
    let cache = RedisCache::connect(c).await.unwrap();
    cache.set("tls", &"secure").await.unwrap();
    assert_eq!(
        cache.get::<String>("tls").await.unwrap().as_deref(),
        Some("secure")
    );
    // Plain text on the TLS port fails with a typed error rather than hanging.
    let mut plain = RedisConfig::from_url(&format!("redis://127.0.0.1:{tls_port}/")).unwrap();
    plain.health_check_interval = None;
    plain.connect_timeout = Duration::from_millis(300);
    plain.response_timeout = Duration::from_millis(300);
    let r = async { RedisCache::connect(plain).await?.set("x", &1).await }.await;
    assert!(r.is_err());
}

/// Runs openssl with `args` in `dir`; panics with its stderr on failure.
#[cfg(feature = "tls")]
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed for the TLS tests");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server certificate signed by a private CA is verified against that CA (`tls_ca_file`):
/// trusted with it, rejected without it, and rejected when it names another host.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verifies_the_server_certificate_against_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let subj_ca = "/CN=ncm-cache test CA";
    openssl(
        d,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", subj_ca,
            "-keyout", "ca.key", "-out", "ca.pem",
        ],
    );
    // One certificate for 127.0.0.1, one for another name.
    for (name, san) in [("good", "IP:127.0.0.1"), ("wrong", "DNS:elsewhere.example")] {
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=redis",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        std::fs::write(
            d.join(format!("{name}.ext")),
            format!("subjectAltName={san}\n"),
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
    let start = |name: &str| {
        let tls_lease = ncm_cache_testkit::PortLease::reserve().unwrap();
        let tls_port = tls_lease.port();
        let server = RedisServer::builder()
            .arg("--tls-port", tls_port.to_string())
            .arg(
                "--tls-cert-file",
                d.join(format!("{name}.pem")).display().to_string(),
            )
            .arg(
                "--tls-key-file",
                d.join(format!("{name}.key")).display().to_string(),
            )
            .arg("--tls-auth-clients", "no")
            .start()
            .unwrap();
        ((server, tls_lease), tls_port)
    };
    let config = |port: u16, ca: bool| {
        let mut c = RedisConfig::from_url(&format!("rediss://127.0.0.1:{port}/")).unwrap();
        c.health_check_interval = None;
        c.connect_timeout = Duration::from_millis(500);
        c.response_timeout = Duration::from_millis(500);
        if ca {
            c.tls_ca_file = Some(d.join("ca.pem"));
        }
        c
    };
    let (_good, port) = start("good");
    // Trusted through the CA file: the async client and the blocking one.
    let cache = RedisCache::connect(config(port, true)).await.unwrap();
    cache.set("tls", &"verified").await.unwrap();
    assert_eq!(
        cache.get::<String>("tls").await.unwrap().as_deref(),
        Some("verified")
    );
    let sync = ncm_cache_redis::RedisSyncCache::connect(config(port, true)).unwrap();
    assert_eq!(
        sync.get::<String>("tls").unwrap().as_deref(),
        Some("verified")
    );
    // Without the CA the certificate is not trusted: a typed error, not a connection.
    let untrusted = async {
        RedisCache::connect(config(port, false))
            .await?
            .set("x", &1)
            .await
    }
    .await;
    let err = untrusted.unwrap_err();
    assert!(
        err.is_connection() && err.to_string().contains("TLS handshake failed"),
        "{err:?}"
    );
    // A certificate from the same CA for another host is rejected too.
    let (_wrong, wrong_port) = start("wrong");
    let err = async {
        RedisCache::connect(config(wrong_port, true))
            .await?
            .set("x", &1)
            .await
    }
    .await
    .unwrap_err();
    assert!(
        err.is_connection() && err.to_string().contains("TLS handshake failed"),
        "{err:?}"
    );
    // A missing CA file is a configuration error that names the file.
    let mut missing = config(port, false);
    missing.tls_ca_file = Some(d.join("nope.pem"));
    let err = RedisCache::connect(missing).await.unwrap_err();
    assert!(
        matches!(err, ncm_cache_core::CacheError::Config(ref m) if m.contains("nope.pem")),
        "{err:?}"
    );
}

/// A user whose ACL forbids scripts: a load's "only if absent" store works (`SET NX` needs no
/// script), and a refused one, whose look at the key's type is a script, stays refused — the
/// call does not fail, the forbidden script is counted as an error, and the key of another
/// type is left as it is (docs/ARCHITECTURE.md: "scripts forbidden by an ACL").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_load_store_without_scripts_stays_refused_and_is_counted() {
    let server = RedisServer::builder()
        .args([
            "--user",
            "app",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
            "-@scripting",
            "--user",
            "default",
            "off",
        ])
        .start()
        .unwrap();
    let url = format!("redis://app:pw@{}/", server.addr());
    let mut config = RedisConfig::from_url(&url).unwrap();
    config.key_prefix = "app:".into();
    config.health_check_interval = None;
    let cache = RedisCache::connect(config).await.unwrap();
    let backend = cache.backend();
    let mut raw = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let value = ncm_cache_core::Bytes::from_static(b"loaded");
    assert!(
        backend
            .set_if_absent("fresh", value.clone(), None)
            .await
            .unwrap(),
        "an absent key is stored without a script"
    );
    let _: () = redis::cmd("HSET")
        .arg("app:h")
        .arg("f")
        .arg("v")
        .query_async(&mut raw)
        .await
        .unwrap();
    let errors = backend.get_stats().errors;
    let stored = backend
        .set_if_absent("h", value.clone(), Some(Duration::from_secs(60)))
        .await
        .expect("a refused store whose script is forbidden does not fail the call");
    assert!(
        !stored,
        "the hash was replaced although scripts are forbidden"
    );
    assert_eq!(
        backend.get_stats().errors,
        errors + 1,
        "the forbidden script was not counted as an error"
    );
    let kind: String = redis::cmd("TYPE")
        .arg("app:h")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(kind, "hash");
}
