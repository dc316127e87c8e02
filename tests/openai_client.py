"""The official `openai` package against a running Tandem gateway: a streamed and a non-streamed
chat completion must give the expected text and usage. Usage: openai_client.py BASE_URL MODEL"""
import sys

from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key="unused")
messages = [{"role": "user", "content": "What is the capital of France?"}]

full = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
text = full.choices[0].message.content
assert full.object == "chat.completion", full
assert full.choices[0].message.role == "assistant", full
assert "Paris" in text, text
assert full.choices[0].finish_reason in ("stop", "length"), full
assert full.usage.prompt_tokens > 0 and 0 < full.usage.completion_tokens <= 24, full.usage
assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

chunks = list(client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True}))
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
assert streamed == text, (streamed, text)
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes == [full.choices[0].finish_reason], finishes
assert chunks[-1].choices == [] and chunks[-1].usage == full.usage, chunks[-1]
print("ok:", repr(text))
