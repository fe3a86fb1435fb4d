"""Name tables of the choices whose implementations sit above the config tree: config validation
reads these names, and the registries refuse a registered name missing here, so the two cannot
drift (the aggregation rules and selection policies are light modules: validation reads their
registries directly)."""

ALGORITHMS = ("sparse_zo", "first_order", "lora_zo")  # fed.algorithm, algorithms/ (the default first)
