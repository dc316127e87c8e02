//! Templating, tokenization, limits and sampling parameters, without HTTP.
use tandem_engine::tokenizer::ChatMessage;

use super::*;
use crate::prepare::prepare;
use crate::request::{Input, Parsed};

fn parsed(input: Input) -> Parsed {
    Parsed {
        model: MODEL.into(),
        input,
        max_tokens: None,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: None,
        stop: vec![],
        stream: false,
        include_usage: false,
        ignore_eos: false,
        return_token_ids: false,
    }
}

#[test]
fn chat_prompt_is_rendered_and_parsed_for_special_tokens() {
    let tok = tokenizer();
    let msgs = vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
    ];
    let p = prepare(&tok, 8192, None, &parsed(Input::Messages(msgs.clone()))).unwrap();
    let text = tok.chat_template().render(&msgs, true).unwrap();
    assert_eq!(p.prompt_tokens, tok.encode(&text, true).unwrap());
    // `<|im_start|>` is one id (1), not its characters.
    assert_eq!(p.prompt_tokens[0], 1);
    assert_eq!(p.sampling.max_tokens as usize, 8192 - p.prompt_tokens.len());
    assert_eq!(p.sampling.stop_token_ids, vec![2, 0]);
    assert_eq!(p.sampling.seed, 0);
}

#[test]
fn default_max_tokens_is_capped_by_the_room_left() {
    let tok = tokenizer();
    let req = parsed(Input::Tokens(vec![19556, 28, 905]));
    assert_eq!(
        prepare(&tok, 100, Some(50), &req)
            .unwrap()
            .sampling
            .max_tokens,
        50
    );
    assert_eq!(
        prepare(&tok, 10, Some(50), &req)
            .unwrap()
            .sampling
            .max_tokens,
        7
    );
    let e = prepare(&tok, 3, None, &req).unwrap_err();
    assert_eq!(e.code, Some("context_length_exceeded"));
    assert_eq!(
        e.message,
        "This model's maximum context length is 3 tokens. However, your prompt has 3 tokens, which leaves no room for a completion. Please reduce the length of the prompt."
    );
}

#[test]
fn sampled_requests_without_a_seed_get_different_ones() {
    let tok = tokenizer();
    let mut req = parsed(Input::Text("Hello".into()));
    req.temperature = 0.8;
    let a = prepare(&tok, 100, None, &req).unwrap().sampling.seed;
    let b = prepare(&tok, 100, None, &req).unwrap().sampling.seed;
    assert_ne!(a, b);
    req.seed = Some(7);
    assert_eq!(prepare(&tok, 100, None, &req).unwrap().sampling.seed, 7);
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let tok = tokenizer();
    let e = prepare(&tok, 100, None, &parsed(Input::Tokens(vec![5, 49152]))).unwrap_err();
    assert_eq!(
        e.message,
        "prompt[1] = 49152 is outside the vocabulary of 49152 tokens."
    );
    assert_eq!(e.status.as_u16(), 400);
}
