//! Counting the requests tonic refuses for their size (`--max-request-bytes`). tonic
//! answers them itself, before any handler runs, with a trailers-only response whose
//! `grpc-status` is OUT_OF_RANGE and whose message says the length is too large; a
//! response map on the way out sees that and records a [`Rejection::MessageSize`].

use std::sync::Arc;

use tower::util::MapResponseLayer;

use crate::limits::{Rejection, Rejections};

/// The layer in front of the gRPC routes that counts oversized requests.
pub(crate) fn count_oversized_requests<B>(
    rejections: Arc<Rejections>,
) -> MapResponseLayer<impl Fn(http::Response<B>) -> http::Response<B> + Clone> {
    MapResponseLayer::new(move |response: http::Response<B>| {
        if is_oversized_refusal(response.headers()) {
            rejections.record(Rejection::MessageSize);
            tracing::warn!(
                limit = Rejection::MessageSize.as_str(),
                "request refused: larger than --max-request-bytes"
            );
        }
        response
    })
}

/// Whether `headers` are those of tonic's refusal of an oversized message.
fn is_oversized_refusal(headers: &http::HeaderMap) -> bool {
    let status = headers.get("grpc-status").and_then(|v| v.to_str().ok());
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // grpc-message is percent-encoded; tonic leaves spaces as they are today.
    status == Some("11")
        && (message.contains("message length too large")
            || message.contains("message%20length%20too%20large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    fn refusal(status: &str, message: &str) -> http::Response<()> {
        http::Response::builder()
            .header("grpc-status", status)
            .header("grpc-message", message)
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn only_a_size_refusal_is_counted() {
        let rejections = Arc::new(Rejections::default());
        let responses = [
            (
                "11",
                "decoded message length too large: found 2000000 bytes",
            ),
            ("11", "Error,%20decoded%20message%20length%20too%20large"),
            ("11", "sequence 99 is past the end"),
            ("3", "message length too large"),
        ];
        for (status, message) in responses {
            let inner = tower::service_fn(move |_: ()| async move {
                Ok::<_, std::convert::Infallible>(refusal(status, message))
            });
            let mut svc = count_oversized_requests(rejections.clone()).layer(inner);
            svc.ready().await.unwrap().call(()).await.unwrap();
        }
        assert_eq!(rejections.get(Rejection::MessageSize), 2);
    }
}
