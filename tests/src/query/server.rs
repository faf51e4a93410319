//! The loopback HTTP server plumbing the fidelity layer and the IMDS mock share.

/// The response type of the loopback servers.
pub type HttpResponse = hyper::Response<http_body_util::Full<bytes::Bytes>>;

/// A response with a status, headers and body.
pub fn http_response(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<bytes::Bytes>,
) -> HttpResponse {
    let mut builder = hyper::Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(http_body_util::Full::new(body.into()))
        .expect("static response parts are valid")
}

/// An HTTP/1.1 server on 127.0.0.1 (free port), TCP_NODELAY on every accepted socket (or small
/// answers wait ~40 ms for delayed ACKs). `handle` gets each request with its body read. The
/// server and its connections stop when the returned task is aborted.
pub async fn serve_loopback<F, Fut>(
    handle: F,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>
where
    F: Fn(hyper::Request<bytes::Bytes>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = HttpResponse> + Send + 'static,
{
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // Connections live in this set, so aborting the accept loop drops (aborts) them too.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let _ = stream.set_nodelay(true);
                    let handle = handle.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let handle = handle.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let response = match body.collect().await {
                                    Ok(body) => handle(hyper::Request::from_parts(parts, body.to_bytes())).await,
                                    Err(e) => http_response(400, &[], format!("unreadable body: {e}")),
                                };
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    Ok((addr, task))
}
