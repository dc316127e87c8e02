//! How many streamed tokens per second the bench client parses on one core.
//!
//! A trivial local SSE server (on its own thread) streams `chat.completion.chunk` events, one
//! token each, as fast as it can write them. The same process then reads the same streams twice
//! on a current_thread runtime: first raw, with a plain TCP reader that only counts bytes (the
//! baseline: what the server and loopback deliver), then through `run_bench`, which parses every
//! event and times every chunk. It prints the client's tokens/s against the raw reader's and
//! against the goal of 20,000 tokens/s.
//!
//! cargo run --release -p tandem-bench --example client_throughput -- [TOKENS_PER_STREAM] [STREAMS] [EVENTS_PER_WRITE]
//!
//! EVENTS_PER_WRITE (default 1) is how many events the server puts in one write and one HTTP
//! chunk: 1 is what a serving stack that flushes every token sends; larger batches show the
//! parser alone, with the per-read costs amortised.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GOAL_TOKENS_PER_S: f64 = 20_000.0;

const EVENT: &str = "data: {\"id\":\"chatcmpl-0123456789abcdef\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"tandem\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" tok\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n";

fn http_chunk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

async fn serve(mut sock: TcpStream, per_write: usize) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let (head_end, len) = loop {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (i + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body: serde_json::Value = serde_json::from_slice(&buf[head_end..]).unwrap_or_default();
    let tokens = body["max_tokens"].as_u64().unwrap_or(1000) as usize;
    sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await?;
    let mut batch = Vec::new();
    http_chunk(&mut batch, EVENT.repeat(per_write).as_bytes());
    let mut sent = 0;
    while sent + per_write <= tokens {
        sock.write_all(&batch).await?;
        sent += per_write;
    }
    let mut tail = Vec::new();
    // An empty HTTP chunk would end the body: only write the remainder if there is one.
    if tokens > sent {
        http_chunk(&mut tail, EVENT.repeat(tokens - sent).as_bytes());
    }
    let end = format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":8,\"completion_tokens\":{tokens}}}}}\n\ndata: [DONE]\n\n"
    );
    http_chunk(&mut tail, end.as_bytes());
    tail.extend_from_slice(b"0\r\n\r\n");
    sock.write_all(&tail).await?;
    sock.flush().await
}

/// Starts the server on its own thread and runtime, so it does not share the client's core.
fn start_server(per_write: usize) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            while let Ok((sock, _)) = listener.accept().await {
                sock.set_nodelay(true).ok();
                tokio::spawn(serve(sock, per_write));
            }
        });
    });
    Ok(addr)
}

/// Reads one stream of `tokens` tokens without parsing it; returns the bytes read.
async fn raw_read(addr: SocketAddr, tokens: usize) -> std::io::Result<usize> {
    let mut sock = TcpStream::connect(addr).await?;
    let body =
        format!("{{\"model\":\"m\",\"prompt\":\"x\",\"max_tokens\":{tokens},\"stream\":true}}");
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args().skip(1);
    let tokens: usize = argv
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let streams: usize = argv.next().map(|s| s.parse()).transpose()?.unwrap_or(4);
    let per_write: usize = argv
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1)
        .max(1);
    let addr = start_server(per_write)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Warm the server, the loopback and the allocator once before either timed read.
        raw_read(addr, 10_000).await?;

        let t = Instant::now();
        let reads = futures::future::join_all((0..streams).map(|_| raw_read(addr, tokens))).await;
        let raw_s = t.elapsed().as_secs_f64();
        let bytes: usize = reads
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .sum();
        let raw_tps = (tokens * streams) as f64 / raw_s;

        let args = tandem_bench::BenchArgs::try_parse_from([
            "bench".to_string(),
            "--url".into(),
            format!("http://{addr}"),
            // The trivial server has no model list to default from.
            "--model".into(),
            "tandem".into(),
            "--quiet".into(),
            "--requests".into(),
            streams.to_string(),
            "--concurrency".into(),
            streams.to_string(),
            "--isl".into(),
            "8".into(),
            "--osl".into(),
            tokens.to_string(),
        ])?;
        let report = tandem_bench::run_bench(args, None).await?;
        let s = &report.runs[0].summary;
        anyhow::ensure!(s.failed == 0, "client runs failed: {:?}", s.errors);
        anyhow::ensure!(
            s.total_output_tokens == (tokens * streams) as u64,
            "client counted {} tokens, the server sent {}",
            s.total_output_tokens,
            tokens * streams
        );
        let chunks: usize = report.runs[0].records.iter().map(|r| r.chunk_s.len()).sum();
        anyhow::ensure!(chunks == tokens * streams, "client timed {chunks} chunks");
        let client_tps = s.output_token_throughput;

        println!(
            "streams {streams} x {tokens} tokens, {} bytes per event, {per_write} events per write",
            EVENT.len()
        );
        println!(
            "raw TCP reader:   {raw_tps:>12.0} tokens/s  ({:.0} MB/s, {bytes} bytes)",
            bytes as f64 / raw_s / 1e6
        );
        println!("bench client:     {client_tps:>12.0} tokens/s  (parsed and timed, one core)");
        println!("client / raw:     {:>12.3}", client_tps / raw_tps);
        println!(
            "client / goal:    {:>12.2}  (goal {GOAL_TOKENS_PER_S:.0} tokens/s)",
            client_tps / GOAL_TOKENS_PER_S
        );
        Ok::<_, anyhow::Error>(())
    })
}
