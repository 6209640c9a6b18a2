"""The container runtimes the prefetcher puts images into (each a `model.Runtime`)."""
