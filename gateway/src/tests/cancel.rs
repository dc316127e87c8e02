//! A client that goes away cancels the generation: the backend's stream is dropped.
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

#[tokio::test]
async fn dropping_the_response_body_drops_the_token_stream() {
    let fake = FakeBackend::new(Script::ItemsThenHang(vec![Ok(chunk(ids("Hello"), None))]));
    let app = app(fake.clone());
    let body = json!({"model": MODEL, "prompt": "x", "stream": true});
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut frames = resp.into_body().into_data_stream();
    let first = frames.next().await.unwrap().unwrap();
    assert!(
        std::str::from_utf8(&first)
            .unwrap()
            .contains("\"text\":\"Hello\""),
        "{first:?}"
    );
    assert!(!fake.was_dropped(), "the generation is still running");
    drop(frames);
    // No wait needed: the body owns the stream, so it went with it.
    assert!(fake.was_dropped());
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_generation() {
    let fake = FakeBackend::new(Script::Endless(ids("la")[0]));
    let state = AppState::new(config(fake.clone())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve(listener, state, async {
        let _ = stop_rx.await;
    }));

    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "sing"}], "stream": true})
            .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    // Read until generated text arrives, so the generation is surely under way.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"la\"") {
        let n = sock.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "server closed early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200 OK"));
    assert!(!fake.was_dropped());
    drop(sock);
    // The endless stream only ends by being dropped; the timeout only bounds a failing test.
    tokio::time::timeout(Duration::from_secs(60), fake.dropped_note.notified())
        .await
        .expect("the token stream was not dropped after the client left");
    assert!(fake.was_dropped());
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_a_whole_body_request_cancels_it() {
    let fake = FakeBackend::new(Script::ItemsThenHang(vec![Ok(chunk(ids("Hello"), None))]));
    let state = AppState::new(config(fake.clone())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve(listener, state, async {
        let _ = stop_rx.await;
    }));
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = json!({"model": MODEL, "prompt": "x"}).to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    fake.started.notified().await;
    drop(sock);
    tokio::time::timeout(Duration::from_secs(60), fake.dropped_note.notified())
        .await
        .expect("the token stream was not dropped after the client left");
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
