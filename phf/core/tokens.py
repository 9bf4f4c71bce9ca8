"""The names of the special tokens: end of document and the two control tokens of conditional training."""

EOS = "<|endoftext|>"
ALIGNED = "<|aligned|>"
MISALIGNED = "<|misaligned|>"
CONTROL_TOKENS = (ALIGNED, MISALIGNED)
SPECIAL_TOKENS = [EOS, ALIGNED, MISALIGNED]
