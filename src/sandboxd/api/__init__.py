"""The wire contract: request models, error bodies, SSE framing and routes."""
