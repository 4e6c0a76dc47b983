"""Model engines behind the serving pipeline (torch now, vLLM for the reasoning stage)."""
