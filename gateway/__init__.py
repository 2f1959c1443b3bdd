"""The OpenAI-compatible HTTP gateway: validation, chat templates, tokenization, SSE; talks to the router over gRPC."""
