"""HTTP serving: an OpenAI-compatible server (SERVING.md), safe media fetching and the web chat page."""
