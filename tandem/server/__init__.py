"""tandem's HTTP server: OpenAI's API over one model (docs/server.md)."""
