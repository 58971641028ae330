"""The special tokens: the one place their strings are defined.

Their ids are assigned by the tokenizer, directly above the merged tokens, in the order
below. ``NUM_RESERVED_SPECIAL`` ids are set aside in total, so new roles can be added later
without changing the id of any existing token: a new one goes at the END of
``SPECIAL_TOKENS`` (a tokenizer saved before it gets it at load, in its reserved id).
"""

ENDOFTEXT = "<|endoftext|>"  # ends a document, and ends a conversation
USER = "<|user|>"  # starts a user turn in the chat template
ASSISTANT = "<|assistant|>"  # starts an assistant turn in the chat template
SYSTEM = "<|system|>"  # starts the system prompt, the optional first turn of a conversation

SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, USER, ASSISTANT, SYSTEM)
NUM_RESERVED_SPECIAL = 16
