"""The names of the special tokens: end of document, the two control tokens of conditional training, and the
`<|hidden|>` token that stands in for each flagged token under `masking-hidden` (appended to a tokenizer only for
that objective, so every other run's vocabulary is unchanged)."""

EOS = "<|endoftext|>"
ALIGNED = "<|aligned|>"
MISALIGNED = "<|misaligned|>"
CONTROL_TOKENS = (ALIGNED, MISALIGNED)
SPECIAL_TOKENS = [EOS, ALIGNED, MISALIGNED]
HIDDEN = "<|hidden|>"
