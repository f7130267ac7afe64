"""Model components: vision encoder, LLM, projectors and the VLM that joins them."""
