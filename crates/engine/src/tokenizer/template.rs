//! The model's own chat template, rendered with minijinja the way Hugging Face renders it
//! (Jinja with `trim_blocks` and `lstrip_blocks`, `raise_exception`, Python string methods).

use crate::error::{EngineError, Result};
use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or whatever roles the model's template knows.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// ChatML, for models that ship no template of their own.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template with the special-token strings it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    is_fallback: bool,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja chat template), or ChatML when `source` is `None` or blank.
    /// `bos_token` and `eos_token` are the strings the template sees under those names.
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self> {
        let (source, is_fallback) = match source {
            Some(s) if !s.trim().is_empty() => (s.to_owned(), false),
            _ => (CHATML_TEMPLATE.to_owned(), true),
        };
        let mut env = Environment::new();
        // Hugging Face compiles chat templates with these two options; without them the
        // whitespace around block tags differs from what the model was trained on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| {
                EngineError::Template(format!("cannot compile the chat template: {e:#}"))
            })?;
        Ok(Self {
            env,
            source,
            is_fallback,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// ChatML with the given special-token strings.
    pub fn chatml(bos_token: &str, eos_token: &str) -> Self {
        // ChatML is a constant that compiles; `new` only fails on a template from outside.
        Self::new(None, bos_token, eos_token).unwrap_or_else(|e| panic!("ChatML must compile: {e}"))
    }

    /// The Jinja source in use.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the model had no template and ChatML is used instead.
    pub fn is_fallback(&self) -> bool {
        self.is_fallback
    }

    /// Renders a conversation to the prompt text. With `add_generation_prompt` the text ends with
    /// the header of the assistant's turn, ready for generation.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(EngineError::Template("no messages to render".into()));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::Template(format!("{e:#}")))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| EngineError::Template(format!("rendering failed: {e:#}")))
    }
}

/// Templates call `raise_exception('...')` to reject a conversation they cannot format.
fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(turns: &[(&str, &str)]) -> Vec<ChatMessage> {
        turns
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect()
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None, "<s>", "</s>").unwrap();
        assert!(t.is_fallback());
        let out = t.render(&msgs(&[("user", "Hi")]), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&msgs(&[("user", "Hi")]), false).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn empty_messages_is_an_error() {
        let t = ChatTemplate::chatml("", "");
        let err = t.render(&[], true).unwrap_err();
        assert!(
            matches!(err, EngineError::Template(ref m) if m.contains("no messages")),
            "{err}"
        );
    }

    #[test]
    fn bos_eos_loop_and_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}{% if loop.first %}[first]{% endif %}\
                   {{ m.role | upper }}: {{ m.content.strip() }}{% if not loop.last %} | {% endif %}\
                   {% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(Some(src), "<s>", "</s>").unwrap();
        let out = t
            .render(&msgs(&[("user", "  a  "), ("assistant", "b\n")]), false)
            .unwrap();
        assert_eq!(out, "<s>[first]USER: a | ASSISTANT: b</s>");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hugging_face() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(Some(src), "", "").unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "x"), ("user", "y")]), false)
                .unwrap(),
            "U:x\nU:y\n"
        );
    }

    #[test]
    fn raise_exception_becomes_a_template_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let t = ChatTemplate::new(Some(src), "", "").unwrap();
        assert_eq!(t.render(&msgs(&[("user", "x")]), false).unwrap(), "ok");
        let err = t.render(&msgs(&[("system", "x")]), false).unwrap_err();
        assert!(
            matches!(err, EngineError::Template(ref m) if m.contains("first must be user")),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_is_reported_at_load() {
        let err = ChatTemplate::new(Some("{% for m in messages %}"), "", "").unwrap_err();
        assert!(
            matches!(err, EngineError::Template(ref m) if m.contains("compile")),
            "{err}"
        );
    }
}
