"""tandem's HTTP server: OpenAI's and Ollama's APIs over one model (docs/server.md)."""
