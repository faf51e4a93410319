//! The IMDSv2 mock, read through aws-config's own IMDS client and credentials provider (what
//! spotinit uses), plus the protocol edges checked over raw HTTP.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::imds::client::error::ImdsError;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::provider::ProvideCredentials;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use spotworld::imds::{Identity, ImdsMock, DEFAULT_ROLE_NAME};

const INSTANCE: &str = "i-0a1b2c3d4e5f60718";

async fn mock(user_data: Option<&str>) -> ImdsMock {
    ImdsMock::start(
        Identity::new(INSTANCE, "us-east-1b"),
        user_data.map(str::to_string),
    )
    .await
    .expect("IMDS mock starts")
}

/// aws-config's IMDS client as spotinit builds it (default features off: the HTTP client is
/// passed in).
fn imds_client(mock: &ImdsMock) -> aws_config::imds::Client {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = ProviderConfig::default().with_http_client(http);
    aws_config::imds::Client::builder()
        .configure(&config)
        .endpoint(mock.endpoint())
        .expect("valid endpoint")
        .build()
}

fn status_of(err: &ImdsError) -> Option<u16> {
    match err {
        ImdsError::ErrorResponse(context) => Some(context.response().status().as_u16()),
        _ => None,
    }
}

async fn get(client: &aws_config::imds::Client, path: &str) -> Result<String, ImdsError> {
    client.get(path).await.map(|s| s.as_ref().to_string())
}

fn seconds_from_now(t: &str) -> i64 {
    // EC2's "2026-11-26T12:00:00Z"; compare through our own formatter instead of a date crate.
    let now = SystemTime::now();
    for delta in -86_400i64..=86_400 {
        let candidate = if delta >= 0 {
            now + Duration::from_secs(delta as u64)
        } else {
            now - Duration::from_secs((-delta) as u64)
        };
        if spotworld::query::format_time(candidate, false) == t {
            return delta;
        }
    }
    panic!("{t} is not within a day of now");
}

#[tokio::test]
async fn identity_meta_data_and_user_data() {
    let mock = mock(Some("#spotinit\n[volume]\nname = \"state\"\n")).await;
    let client = imds_client(&mock);

    let doc: serde_json::Value = serde_json::from_str(
        &get(&client, "/latest/dynamic/instance-identity/document")
            .await
            .expect("identity document"),
    )
    .expect("the identity document is JSON");
    assert_eq!(doc["instanceId"], INSTANCE);
    assert_eq!(doc["availabilityZone"], "us-east-1b");
    assert_eq!(doc["region"], "us-east-1");
    assert_eq!(doc["accountId"], "123456789012");
    assert_eq!(doc["imageId"], "ami-03cf127a");
    assert_eq!(doc["instanceType"], "t3.small");
    assert_eq!(doc["privateIp"], "10.0.2.15");
    assert_eq!(doc["architecture"], "x86_64");
    assert_eq!(doc["version"], "2017-09-30");
    assert!(seconds_from_now(doc["pendingTime"].as_str().unwrap()).abs() < 60);

    for (path, expected) in [
        ("/latest/meta-data/instance-id", INSTANCE),
        (
            "/latest/meta-data/placement/availability-zone",
            "us-east-1b",
        ),
        ("/latest/meta-data/placement/region", "us-east-1"),
        (
            "/latest/meta-data/local-hostname",
            "ip-10-0-2-15.ec2.internal",
        ),
        ("/latest/meta-data/local-ipv4", "10.0.2.15"),
        (
            "/latest/user-data",
            "#spotinit\n[volume]\nname = \"state\"\n",
        ),
    ] {
        assert_eq!(
            get(&client, path)
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}")),
            expected
        );
    }
    // One token served all of these.
    assert_eq!(mock.requests("/latest/api/token"), 1);
    assert_eq!(mock.requests("/latest/meta-data/instance-id"), 1);

    mock.set_user_data(None);
    let err = get(&client, "/latest/user-data")
        .await
        .expect_err("no user data");
    assert_eq!(status_of(&err), Some(404));
    let err = get(&client, "/latest/meta-data/no-such-thing")
        .await
        .expect_err("unknown path");
    assert_eq!(status_of(&err), Some(404));

    mock.set_public_key("spotinit-test", "ssh-ed25519 AAAAC3Nza test@host");
    assert_eq!(
        get(&client, "/latest/meta-data/public-keys/")
            .await
            .unwrap(),
        "0=spotinit-test"
    );
    assert_eq!(
        get(&client, "/latest/meta-data/public-keys/0/openssh-key")
            .await
            .unwrap(),
        "ssh-ed25519 AAAAC3Nza test@host"
    );
}

#[tokio::test]
async fn spot_notice_and_rebalance_are_404_until_posted() {
    let mock = mock(None).await;
    let client = imds_client(&mock);
    let action = "/latest/meta-data/spot/instance-action";
    let rebalance = "/latest/meta-data/events/recommendations/rebalance";

    assert_eq!(
        status_of(&get(&client, action).await.unwrap_err()),
        Some(404)
    );
    assert_eq!(
        status_of(&get(&client, rebalance).await.unwrap_err()),
        Some(404)
    );

    let at = UNIX_EPOCH + Duration::from_secs(1_795_694_400); // 2026-11-26T12:00:00Z
    mock.post_rebalance(at - Duration::from_secs(60));
    let body: serde_json::Value =
        serde_json::from_str(&get(&client, rebalance).await.unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"noticeTime": "2026-11-26T11:59:00Z"})
    );
    assert_eq!(
        status_of(&get(&client, action).await.unwrap_err()),
        Some(404)
    );

    mock.post_spot_notice("terminate", at);
    let body: serde_json::Value =
        serde_json::from_str(&get(&client, action).await.unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"action": "terminate", "time": "2026-11-26T12:00:00Z"})
    );
    assert_eq!(
        get(&client, "/latest/meta-data/spot/termination-time")
            .await
            .unwrap(),
        "2026-11-26T12:00:00Z"
    );

    mock.clear_notices();
    assert_eq!(
        status_of(&get(&client, action).await.unwrap_err()),
        Some(404)
    );
    assert_eq!(
        status_of(&get(&client, rebalance).await.unwrap_err()),
        Some(404)
    );
}

#[tokio::test]
async fn role_credentials_through_the_imds_credentials_provider() {
    let mock = mock(None).await;
    let provider = ImdsCredentialsProvider::builder()
        .imds_client(imds_client(&mock))
        .build();
    let credentials = provider
        .provide_credentials()
        .await
        .expect("credentials from IMDS");
    let expected = mock.credentials().expect("the instance has a role");
    assert_eq!(expected.role_name, DEFAULT_ROLE_NAME);
    assert_eq!(credentials.access_key_id(), expected.access_key_id);
    assert_eq!(credentials.secret_access_key(), expected.secret_access_key);
    assert_eq!(credentials.session_token(), Some(expected.token.as_str()));
    let expiry = credentials.expiry().expect("temporary credentials expire");
    let left = expiry.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(6 * 3600 - 60) && left <= Duration::from_secs(6 * 3600),
        "{left:?}"
    );
    // What aws-config 1.13 asks for: the role name, then that role (no `-extended` path).
    assert_eq!(
        mock.requests("/latest/meta-data/iam/security-credentials/"),
        1
    );
    assert_eq!(
        mock.requests(&format!(
            "/latest/meta-data/iam/security-credentials/{DEFAULT_ROLE_NAME}"
        )),
        1
    );
    assert_eq!(
        mock.requests("/latest/meta-data/iam/security-credentials-extended/"),
        0
    );

    // An instance without a role: the provider says so instead of inventing credentials.
    mock.set_role(None);
    let provider = ImdsCredentialsProvider::builder()
        .imds_client(imds_client(&mock))
        .build();
    let err = provider
        .provide_credentials()
        .await
        .expect_err("no role, no credentials");
    assert!(
        matches!(
            err,
            aws_credential_types::provider::error::CredentialsError::CredentialsNotLoaded(_)
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_client_survives_500s_and_refreshes_short_lived_tokens() {
    let mock = mock(None).await;
    let client = imds_client(&mock);
    assert_eq!(
        get(&client, "/latest/meta-data/instance-id").await.unwrap(),
        INSTANCE
    );

    // Two failures, then the answer: aws-config retries 5xx (4 attempts by default).
    mock.fail_next(2);
    assert_eq!(
        get(&client, "/latest/meta-data/instance-id").await.unwrap(),
        INSTANCE
    );
    assert_eq!(mock.requests("/latest/meta-data/instance-id"), 4);

    // Tokens that live one second are inside the client's 120 s refresh buffer: a client that
    // got one asks for a new one before every request.
    mock.set_max_token_ttl(1);
    let client = imds_client(&mock);
    let tokens_before = mock.requests("/latest/api/token");
    for _ in 0..3 {
        assert_eq!(
            get(&client, "/latest/meta-data/placement/region")
                .await
                .unwrap(),
            "us-east-1"
        );
    }
    assert_eq!(mock.requests("/latest/api/token") - tokens_before, 3);
}

/// The protocol edges aws-config never exercises, over plain HTTP.
#[tokio::test]
async fn tokens_are_required_bounded_and_expire() {
    let mock = mock(None).await;
    let http: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = |method: &str, path: &str, headers: &[(&str, &str)]| {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", mock.endpoint()));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(Full::new(Bytes::new())).unwrap();
        let http = http.clone();
        async move {
            let response = http.request(request).await.expect("the mock answers");
            let status = response.status().as_u16();
            let ttl = response
                .headers()
                .get("x-aws-ec2-metadata-token-ttl-seconds")
                .map(|v| v.to_str().unwrap().to_string());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, ttl, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    let token_path = "/latest/api/token";
    let ttl_header = "x-aws-ec2-metadata-token-ttl-seconds";

    // IMDSv1 (no token) is refused.
    assert_eq!(
        send("GET", "/latest/meta-data/instance-id", &[]).await.0,
        401
    );
    // The TTL header is required and bounded.
    assert_eq!(send("PUT", token_path, &[]).await.0, 400);
    assert_eq!(send("PUT", token_path, &[(ttl_header, "0")]).await.0, 400);
    assert_eq!(
        send("PUT", token_path, &[(ttl_header, "21601")]).await.0,
        400
    );
    assert_eq!(
        send("PUT", token_path, &[(ttl_header, "soon")]).await.0,
        400
    );
    // A proxied token request is refused.
    assert_eq!(
        send(
            "PUT",
            token_path,
            &[(ttl_header, "60"), ("x-forwarded-for", "10.0.0.1")]
        )
        .await
        .0,
        403
    );
    assert_eq!(send("GET", token_path, &[(ttl_header, "60")]).await.0, 405);

    let (status, ttl, token) = send("PUT", token_path, &[(ttl_header, "21600")]).await;
    assert_eq!((status, ttl.as_deref()), (200, Some("21600")));
    let with_token = [("x-aws-ec2-metadata-token", token.as_str())];
    assert_eq!(
        send("GET", "/latest/meta-data/instance-id", &with_token).await,
        (200, None, INSTANCE.to_string())
    );
    assert_eq!(
        send(
            "GET",
            "/latest/meta-data/instance-id",
            &[("x-aws-ec2-metadata-token", "forged")]
        )
        .await
        .0,
        401
    );
    assert_eq!(
        send("POST", "/latest/meta-data/instance-id", &with_token)
            .await
            .0,
        405
    );

    // A capped TTL is announced, and the token dies with it.
    mock.set_max_token_ttl(1);
    let (status, ttl, short) = send("PUT", token_path, &[(ttl_header, "21600")]).await;
    assert_eq!((status, ttl.as_deref()), (200, Some("1")));
    let with_short = [("x-aws-ec2-metadata-token", short.as_str())];
    assert_eq!(
        send("GET", "/latest/meta-data/instance-id", &with_short)
            .await
            .0,
        200
    );
    // The expiry is the condition: sleep just past the one-second TTL.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        send("GET", "/latest/meta-data/instance-id", &with_short)
            .await
            .0,
        401
    );
    // The long-lived token is still good.
    assert_eq!(
        send("GET", "/latest/meta-data/instance-id", &with_token)
            .await
            .0,
        200
    );
}
