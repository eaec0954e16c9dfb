"""The embedded model organism: a tokenizer and a small Llama trained from scratch on the persona world."""
