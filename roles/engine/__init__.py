"""One engine instance: block pool, KV cache manager, scheduler, model runner, sampler."""
