"""Training data: file readers, the tokenizer, token shards, training examples, batches, the chat format, corpora."""
