//! The official `openai` Python package (CI installs it with pip) against `tandem up`.
#![allow(clippy::unwrap_used)]

mod support;

use support::Up;

#[test]
fn the_openai_python_client_streams_and_non_streams_a_chat_completion() {
    let up = Up::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/openai_client.py");
    let out = std::process::Command::new("python3")
        .args([script, &up.url, &up.model])
        .output()
        .expect("running python3 (CI installs it with the openai package)");
    assert!(
        out.status.success(),
        "openai client failed (is `pip install openai` done?):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
