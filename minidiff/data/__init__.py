"""Training data: file readers, token shards, training examples, the chat format, corpora, the tokenizer."""
