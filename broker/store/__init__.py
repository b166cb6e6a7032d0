"""Where shared state lives: the store and bus interfaces, the embedded backends and the Redis ones."""
