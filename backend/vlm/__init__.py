"""Vision-language chat beside the LLM: safe image loading, the runners (hf, mlx), the service."""
