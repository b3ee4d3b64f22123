"""Programs built on the library: `quickstart` (the offline embedding distillation demo) and `tiny` (tiny
config-built models and a tokenizer trained from local text, for tests and offline examples)."""
