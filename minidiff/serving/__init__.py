"""The server room: a model behind an OpenAI-compatible API, batching requests at block boundaries."""
