"""HTTP routes: OpenAI surface, admin API, health and metrics."""
