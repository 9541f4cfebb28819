"""Running models: batching, the inference backends (one per runtime) and the benchmark around them."""
