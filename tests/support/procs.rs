//! Single `tandem` processes for tests that assemble a cluster by hand (a standalone router, a
//! gateway that places through it, workers on other "hosts").
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tandem <args>` (stdin piped, so that `--exit-with-stdin` workers stop with the test)
/// and returns it with what follows `prefix` on the first line of its standard error that starts
/// with it (its other lines go to the test's output).
pub fn start(args: &[&str], prefix: &'static str) -> (Proc, String) {
    let mut child = Command::new(super::BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting tandem {args:?}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            match line.strip_prefix(prefix) {
                Some(rest) if tx.is_some() => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(rest.to_owned());
                    }
                }
                _ => eprintln!("{line}"),
            }
        }
    });
    let rest = rx
        .recv_timeout(Duration::from_secs(240))
        .unwrap_or_else(|_| panic!("tandem {args:?} never printed {prefix:?}"));
    (Proc(child), rest)
}

/// `tandem router --listen <listen>` and the address it listens on.
pub fn router(listen: &str) -> (Proc, String) {
    start(&["router", "--listen", listen], "router listening on ")
}

/// `tandem gateway --port 0 <args>`, its URL, and its embedded router's address (none when it
/// places through standalone routers).
pub fn gateway(args: &[&str]) -> (Proc, String, Option<String>) {
    let model = super::model_path();
    let mut all = vec!["gateway", "--port", "0", "--model", model.to_str().unwrap()];
    all.extend_from_slice(args);
    let (p, rest) = start(&all, "gateway on http://");
    let addr = rest.split(' ').next().unwrap().to_owned();
    let router = rest
        .split_once("workers register with --router ")
        .map(|(_, r)| r.to_owned());
    (p, format!("http://{addr}"), router)
}

/// `tandem <role> --router <router> --threads 1 --exit-with-stdin --model <default> <extra>`: a
/// worker that stops with the test.
pub fn worker(role: &str, router: &str, extra: &[&str]) -> Proc {
    Proc(
        Command::new(super::BIN)
            .args([
                role,
                "--router",
                router,
                "--threads",
                "1",
                "--exit-with-stdin",
            ])
            .arg("--model")
            .arg(super::model_path())
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}
