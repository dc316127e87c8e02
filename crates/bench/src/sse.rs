//! An incremental Server-Sent Events parser: bytes in, the `data` of each complete event out.
//! Events end at a blank line; `\n` and `\r\n` line ends are both accepted; comment lines (`:`)
//! and the `event`, `id` and `retry` fields are ignored, as the OpenAI stream carries everything
//! in `data`.

/// Holds a partial line and the data of the event being read.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
}

impl SseParser {
    /// Feeds `bytes`; calls `on_event` with the data of each event completed by them. Stops early
    /// and returns the error if `on_event` fails.
    pub fn push<E>(
        &mut self,
        mut bytes: &[u8],
        mut on_event: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(nl) = bytes.iter().position(|b| *b == b'\n') {
            let (head, rest) = bytes.split_at(nl);
            bytes = &rest[1..];
            let line: &[u8] = if self.line.is_empty() {
                head
            } else {
                self.line.extend_from_slice(head);
                &self.line
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                if self.has_data {
                    let r = on_event(&self.data);
                    self.data.clear();
                    self.has_data = false;
                    self.line.clear();
                    r?;
                }
            } else if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            self.line.clear();
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// Whether bytes of an unfinished line or event are held.
    pub fn pending(&self) -> bool {
        self.has_data || !self.line.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(parts: &[&[u8]]) -> Vec<String> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for part in parts {
            let r: Result<(), ()> = p.push(part, |d| {
                out.push(String::from_utf8_lossy(d).into_owned());
                Ok(())
            });
            assert_eq!(r, Ok(()));
        }
        out
    }

    #[test]
    fn splits_events_across_any_boundary() {
        let whole: &[u8] = b": keep-alive\n\ndata: {\"a\":1}\n\ndata:[DONE]\r\n\r\n";
        let want = vec!["{\"a\":1}".to_string(), "[DONE]".to_string()];
        assert_eq!(events(&[whole]), want);
        for cut in 0..whole.len() {
            let (a, b) = whole.split_at(cut);
            assert_eq!(events(&[a, b]), want, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(events(&bytes), want);
    }

    #[test]
    fn joins_multi_line_data_and_ignores_other_fields() {
        let got = events(&[b"event: message\nid: 3\ndata: one\ndata: two\nretry: 5\n\n"]);
        assert_eq!(got, vec!["one\ntwo".to_string()]);
    }

    #[test]
    fn reports_pending_and_stops_on_error() {
        let mut p = SseParser::default();
        let r: Result<(), &str> = p.push(b"data: x\n", |_| Ok(()));
        assert_eq!(r, Ok(()));
        assert!(p.pending());
        let r = p.push(b"\ndata: y\n\n", |d| {
            if d == b"x" { Err("stop") } else { Ok(()) }
        });
        assert_eq!(r, Err("stop"));
    }
}
